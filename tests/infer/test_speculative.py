"""Speculative decoding: greedy output is exactly the target's; the sampling rule draws from p."""

import pytest
import torch
from hf_models import randomize_

import lmstack
from lmstack.errors import ConfigError
from lmstack.infer import GenerationConfig, generate
from lmstack.infer.speculative import accept_tokens, speculative_generate


def _model(family, seed):
    model, _ = lmstack.load(f"tiny-{family}", random_init=True, seed=0)
    return randomize_(model, seed=seed, std=0.15).eval()


@pytest.mark.parametrize("k", [2, 4])
def test_greedy_equals_target_alone(k):
    target, draft = _model("llama", 1), _model("qwen3", 2)
    prompt = [5, 9, 11, 3, 8]
    config = GenerationConfig(max_new_tokens=20, eos_token_ids=[])
    expected = generate(target, prompt, config)[0].outputs[0].token_ids
    out, stats = speculative_generate(target, draft, prompt, config, num_draft_tokens=k)
    assert out.outputs[0].token_ids == expected
    assert stats.proposed >= stats.accepted >= 0 and stats.target_passes >= 1
    # the target as its own draft accepts every proposal
    out, stats = speculative_generate(target, target, prompt, config, num_draft_tokens=k)
    assert out.outputs[0].token_ids == expected and stats.acceptance_rate == 1.0


def test_greedy_stops_at_eos_like_the_target():
    target, draft = _model("llama", 1), _model("llama", 3)
    prompt = [5, 9, 11]
    plain = generate(target, prompt, GenerationConfig(max_new_tokens=12, eos_token_ids=[]))[0].outputs[0].token_ids
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=[plain[4]])
    expected = generate(target, prompt, config)[0].outputs[0]
    out, _ = speculative_generate(target, draft, prompt, config, num_draft_tokens=3)
    assert out.outputs[0].token_ids == expected.token_ids and out.outputs[0].finish_reason == "stop"


def test_rejection_rule_reproduces_the_target_distribution():
    """First and second emitted tokens follow p exactly, whatever q proposes (V=4, 10k trials)."""
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.4, 0.3, 0.2, 0.1]])
    gen = torch.Generator().manual_seed(0)
    trials = 10000
    first, pairs = torch.zeros(4), torch.zeros(4, 4)
    for _ in range(trials):
        draft = torch.stack([torch.multinomial(q[i], 1, generator=gen)[0] for i in range(2)])
        n, nxt = accept_tokens(p, q, draft, greedy=False, generator=gen)
        emitted = draft[:n].tolist() + [nxt]
        first[emitted[0]] += 1
        if len(emitted) >= 2:
            pairs[emitted[0], emitted[1]] += 1
    assert (first / trials - p[0]).abs().max() < 0.02
    # given the first token was accepted, the second follows p[1] (p does not depend on the prefix here)
    second = pairs.sum(0) / pairs.sum()
    assert (second - p[1]).abs().max() < 0.03


def test_sampling_runs_and_is_seeded():
    target, draft = _model("llama", 1), _model("llama", 3)
    config = GenerationConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=5, eos_token_ids=[])
    a, stats = speculative_generate(target, draft, [4, 5, 6], config)
    b, _ = speculative_generate(target, draft, [4, 5, 6], config)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(a.outputs[0].token_ids) == 10
    assert 0.0 <= stats.acceptance_rate <= 1.0


def test_mismatched_vocab_and_penalties_are_errors():
    target = _model("llama", 1)
    other = _model("llama", 2)
    other.config.vocab_size = 255
    with pytest.raises(ConfigError, match="vocab_size=255 differs"):
        speculative_generate(target, other, [1, 2], GenerationConfig(max_new_tokens=2))
    # the message names each option set and its value, and only those
    for options, named in [
        (dict(repetition_penalty=1.1), r"\(got repetition_penalty=1.1\)"),
        (dict(presence_penalty=0.5), r"\(got presence_penalty=0.5\)"),
        (dict(frequency_penalty=-0.25), r"\(got frequency_penalty=-0.25\)"),
        (dict(min_tokens=2), r"\(got min_tokens=2\)"),
        (dict(repetition_penalty=0.9, min_tokens=1), r"\(got repetition_penalty=0.9, min_tokens=1\)"),
    ]:
        with pytest.raises(ConfigError, match="speculative decoding does not support penalties or min_tokens " + named):
            speculative_generate(target, target, [1, 2], GenerationConfig(max_new_tokens=2, **options))


def test_greedy_with_static_cache_decoders():
    """The CUDA path's static caches (rolled back with crop) give the same tokens."""
    from lmstack.infer import CompiledDecoder

    target, draft = _model("mistral", 1), _model("mistral", 2)  # sliding window 8 < sequence
    prompt = [5, 9, 11, 3, 8]
    config = GenerationConfig(max_new_tokens=16, eos_token_ids=[])
    expected = generate(target, prompt, config)[0].outputs[0].token_ids
    out, _ = speculative_generate(target, draft, prompt, config, num_draft_tokens=3,
                                  target_decoder=CompiledDecoder(target, compile=False),
                                  draft_decoder=CompiledDecoder(draft, compile=False))
    assert out.outputs[0].token_ids == expected


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_reaches_the_end_of_a_learned_position_context(k):
    """GPT-2's position table ends at its context: no round may verify past it (it crashed)."""
    import dataclasses

    from lmstack.config import get_preset

    target = _model("gpt2", 1)
    longer = dataclasses.replace(get_preset("tiny-llama"), max_position_embeddings=512)
    draft = randomize_(lmstack.load("tiny-llama", random_init=True, seed=0, config=longer)[0], seed=2, std=0.15).eval()
    context = target.config.max_position_embeddings
    assert draft.config.max_position_embeddings >= context + k
    prompt = torch.randint(0, 256, (context - 9,), generator=torch.Generator().manual_seed(0)).tolist()
    config = GenerationConfig(max_new_tokens=9, eos_token_ids=[])  # fills the target's context exactly
    expected = generate(target, prompt, config)[0].outputs[0].token_ids
    out, stats = speculative_generate(target, draft, prompt, config, num_draft_tokens=k)
    assert out.outputs[0].token_ids == expected
    assert stats.emitted == 9


def test_stats_count_emitted_tokens_and_logprobs_are_the_targets():
    target = _model("llama", 1)
    prompt = [5, 9, 11]
    plain = generate(target, prompt, GenerationConfig(max_new_tokens=12, eos_token_ids=[], logprobs=2))[0].outputs[0]
    # the target as its own draft: everything accepted, so the output length is what ends rounds
    out, stats = speculative_generate(target, target, prompt, GenerationConfig(max_new_tokens=3, eos_token_ids=[]),
                                      num_draft_tokens=4)
    assert (stats.target_passes, stats.emitted, stats.tokens_per_pass) == (1, 3, 3.0)
    eos = GenerationConfig(max_new_tokens=12, eos_token_ids=[plain.token_ids[1]], logprobs=2)
    out, stats = speculative_generate(target, target, prompt, eos, num_draft_tokens=4)
    assert out.outputs[0].token_ids == plain.token_ids[:2] and stats.emitted == 2 and stats.tokens_per_pass == 2.0
    assert max(abs(a - b) for a, b in zip(out.outputs[0].logprobs, plain.logprobs[:2])) < 1e-5
    assert [list(t) for t in out.outputs[0].top_logprobs] == [list(t) for t in plain.top_logprobs[:2]]
    with pytest.raises(ConfigError, match="speculative decoding does not return prompt_logprobs"):
        speculative_generate(target, target, prompt, GenerationConfig(max_new_tokens=3, prompt_logprobs=1))

"""generate(): batching, static cache, n samples, seeds, stop ids, logprobs, and up-front errors."""

import pytest
import torch
from hf_models import randomize_

import lmstack
from lmstack.errors import ConfigError
from lmstack.infer import CompiledDecoder, Decoder, GenerationConfig, SamplingParams, generate


def _model(family="llama", **changes):
    model, _ = lmstack.load(f"tiny-{family}", random_init=True, seed=0)
    for k, v in changes.items():
        setattr(model.config, k, v)
    return randomize_(model, seed=1, std=0.15).eval()


PROMPTS = [[5, 9, 11, 3, 8, 40, 41], [7, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110]]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_batched_equals_each_prompt_alone(family):
    model = _model(family)
    for config in [GenerationConfig(max_new_tokens=10, eos_token_ids=[]),
                   GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=20, seed=3, repetition_penalty=1.2)]:
        batched = generate(model, PROMPTS, config)
        for prompt, out in zip(PROMPTS, batched):
            alone = generate(model, prompt, config)[0]
            assert out.outputs[0].token_ids == alone.outputs[0].token_ids


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_static_cache_decoder_equals_plain_decoder(family):
    """The CUDA-graph path's static cache (run eagerly here) gives the plain path's tokens."""
    model = _model(family)
    static = CompiledDecoder(model, compile=False, prefill_buckets=(16,))
    for config in [GenerationConfig(max_new_tokens=10, eos_token_ids=[]),
                   GenerationConfig(max_new_tokens=4, eos_token_ids=[], num_beams=2, n=2)]:
        plain = generate(model, PROMPTS, config, decoder=Decoder(model))
        fast = generate(model, PROMPTS, config, decoder=static)  # reused across calls, as on CUDA
        assert [[o.token_ids for o in r.outputs] for r in plain] == [[o.token_ids for o in r.outputs] for r in fast]


def test_make_decoder_keeps_one_compiled_decoder_per_model_and_one_cache_shape(monkeypatch):
    import copy

    import torch._inductor.config as inductor_config

    from lmstack.infer import make_decoder
    from lmstack.infer.decoder import CACHE_STEP

    # the caching is under test, not the compiler: compile is the identity here
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    model = _model("gpt2")
    decoder = make_decoder(model, compile=True)
    assert isinstance(decoder, CompiledDecoder) and make_decoder(model, compile=True) is decoder
    assert make_decoder(copy.deepcopy(model), compile=True) is not decoder  # one per model
    config = GenerationConfig(max_new_tokens=5, eos_token_ids=[])
    # as on CUDA, where generate() without a decoder calls make_decoder(model) each time
    first = generate(model, [PROMPTS[0]], config, decoder=make_decoder(model, compile=True))
    cache = decoder.static
    assert cache is not None and cache.max_length == min(CACHE_STEP, model.config.max_position_embeddings)
    longer = GenerationConfig(max_new_tokens=9, eos_token_ids=[])
    second = generate(model, [PROMPTS[2]], longer, decoder=make_decoder(model, compile=True))
    assert decoder.static is cache  # a longer request still fits the rounded-up cache: same graphs
    for prompt, options, out in [(PROMPTS[0], config, first), (PROMPTS[2], longer, second)]:
        assert out[0].outputs[0].token_ids == generate(model, prompt, options, decoder=Decoder(model))[0].outputs[0].token_ids


def test_static_cache_logits_match_full_forward():
    from lmstack.infer.static_cache import StaticKVCache

    model = _model("mistral")  # window 8 < sequence length
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = StaticKVCache(model.config, 2, 32)
        steps = [model(ids[:, :9], kv_cache=cache).logits]
        steps += [model(ids[:, t:t + 1], kv_cache=cache).logits for t in range(9, 20)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_n_samples_seeded_and_reproducible():
    model = _model()
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, n=3, seed=7, eos_token_ids=[])
    first = generate(model, PROMPTS[0], config)[0].outputs
    again = generate(model, PROMPTS[0], config)[0].outputs
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first}) == 3
    assert [o.index for o in first] == [0, 1, 2]
    other = generate(model, PROMPTS[0], config.replace(seed=8))[0].outputs
    assert [o.token_ids for o in other] != [o.token_ids for o in first]


def test_stop_token_ids_eos_and_min_tokens():
    model = _model()
    greedy = generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=10, eos_token_ids=[]))[0].outputs[0]
    stop = greedy.token_ids[3]
    first = greedy.token_ids.index(stop)
    out = generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=10, eos_token_ids=[], stop_token_ids=[stop]))
    got = out[0].outputs[0]
    assert got.token_ids == greedy.token_ids[: first + 1]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop)
    eos = generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=10, eos_token_ids=[stop]))[0].outputs[0]
    assert eos.token_ids == got.token_ids and eos.stop_reason is None and eos.finish_reason == "stop"
    late = generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=10, eos_token_ids=[stop], min_tokens=first + 2))
    assert stop not in late[0].outputs[0].token_ids[: first + 2]
    ignored = generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=10, eos_token_ids=[stop], ignore_eos=True))
    assert ignored[0].outputs[0].token_ids == greedy.token_ids
    assert ignored[0].outputs[0].finish_reason == "length"


def test_logprobs_equal_log_softmax_of_a_full_forward():
    model = _model()
    out = generate(model, PROMPTS[1], GenerationConfig(max_new_tokens=5, eos_token_ids=[], logprobs=3,
                                                       prompt_logprobs=0))[0]
    completion = out.outputs[0]
    ids = torch.tensor([PROMPTS[1] + completion.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    for i, token in enumerate(completion.token_ids):
        row = logp[len(PROMPTS[1]) - 1 + i]
        assert abs(completion.logprobs[i] - row[token].item()) < 1e-4
        top = row.topk(3)
        assert list(completion.top_logprobs[i]) == top.indices.tolist()
        assert max(abs(a - b) for a, b in zip(completion.top_logprobs[i].values(), top.values.tolist())) < 1e-4
    assert abs(completion.cumulative_logprob - sum(completion.logprobs)) < 1e-6
    assert out.prompt_logprobs[0] is None and abs(out.prompt_logprobs[1] - logp[0, PROMPTS[1][1]].item()) < 1e-4


def test_max_tokens_none_fills_the_context():
    model = _model(max_position_embeddings=20)
    out = generate(model, PROMPTS[0], GenerationConfig(eos_token_ids=[]))[0].outputs[0]
    assert len(out.token_ids) == 20 - len(PROMPTS[0]) and out.finish_reason == "length"


@pytest.mark.parametrize("config,prompt,match", [
    (GenerationConfig(temperature=-1.0), [1, 2], "temperature=-1.0 must be >= 0"),
    (GenerationConfig(top_p=0.0), [1, 2], r"top_p=0.0 must be in \(0, 1\]"),
    (GenerationConfig(top_p=1.01), [1, 2], r"top_p=1.01 must be in \(0, 1\]"),
    (GenerationConfig(max_new_tokens=250), [1] * 10, "max_new_tokens=250 goes beyond the context.*<= 246"),
    (GenerationConfig(max_new_tokens=1), [1] * 256, "prompt 0 has 256 tokens but the model's context is 256"),
    (GenerationConfig(num_beams=2, n=3), [1], "n=3 must not exceed num_beams=2"),
    (GenerationConfig(num_beams=2, temperature=0.5), [1], "with num_beams > 1"),
    (SamplingParams(banned_token_ids=list(range(256))), [1], "ban every token"),
    (GenerationConfig(), [[3], []], "prompt 1 is empty"),
    (GenerationConfig(), [], "no prompts given"),
    (GenerationConfig(), [300], "token id 300 outside the vocabulary"),
    (GenerationConfig(logprobs=True), [1], r"logprobs=True must be None or an integer in \[0, 20\]"),
    (GenerationConfig(n=True), [1], "n=True must be an integer >= 1"),
    (SamplingParams(max_tokens=0), [1], r"max_tokens=0 \(score the prompt, generate nothing\) is for the engine: lmstack.LLM"),
])
def test_invalid_options_fail_before_any_work(config, prompt, match, monkeypatch):
    model = _model()
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ConfigError, match=match):
        generate(model, prompt, config)


def test_beam_search_returns_prompt_logprobs_and_refuses_token_logprobs():
    model = _model()
    prompt = [5, 9, 11, 3]
    beams = generate(model, prompt, GenerationConfig(num_beams=2, max_new_tokens=4, prompt_logprobs=0))[0]
    assert beams.prompt_logprobs == generate(model, prompt, GenerationConfig(max_new_tokens=1, prompt_logprobs=0)
                                             )[0].prompt_logprobs
    assert beams.prompt_logprobs[0] is None and len(beams.prompt_logprobs) == len(prompt)
    with pytest.raises(ConfigError, match="logprobs=2 is not returned by beam search"):
        generate(model, prompt, GenerationConfig(num_beams=2, logprobs=2))


def test_a_seed_whose_later_samples_overflow_is_refused_up_front():
    model = _model()
    assert generate(model, [1], GenerationConfig(seed=2**64 - 2, n=2, max_new_tokens=2, temperature=1.0))
    with pytest.raises(ConfigError, match=r"seed=18446744073709551615 must be an integer that fits in 64 bits "
                                          r"\(sample j of n uses seed \+ j\)"):
        generate(model, [1], GenerationConfig(seed=2**64 - 1, n=2, max_new_tokens=2, temperature=1.0))

"""Each logits processor against transformers' own LogitsProcessor classes or a float64 loop."""

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.infer.params import SamplingParams
from lmstack.infer.sampling import SamplingTensors, TokenCounts, process_logits, sample

V = 50


def _logits(B=3, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _tensors(params):
    return SamplingTensors.from_params(params, V, eos_token_ids=[2])


def _same(ours, ref):
    ours, ref = ours.float(), ref.float()
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, V, V + 10])
def test_top_k_matches_transformers(k):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    x = _logits()
    ours = process_logits(x, _tensors([SamplingParams(temperature=0.7, top_k=k)] * 3))
    ref = TopKLogitsWarper(top_k=k)(None, TemperatureLogitsWarper(0.7)(None, x.clone()))
    _same(ours, ref)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_matches_transformers(p):
    from transformers import TopPLogitsWarper

    x = _logits()
    ours = process_logits(x, _tensors([SamplingParams(top_p=p)] * 3))
    ref = TopPLogitsWarper(top_p=p)(None, x.clone()) if p < 1 else x
    _same(ours, ref)
    if p == 1.0:
        assert not torch.isinf(ours).any()


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3])
def test_min_p_matches_transformers(min_p):
    from transformers import MinPLogitsWarper

    x = _logits()
    ours = process_logits(x, _tensors([SamplingParams(min_p=min_p)] * 3))
    ref = MinPLogitsWarper(min_p=min_p)(None, x.clone()) if min_p > 0 else x
    _same(ours, ref)


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    x = _logits(B=2)
    prompts = [[1, 4, 4, 9], [7, 30, 49]]
    generated = torch.tensor([[5, 4], [0, 0]])
    counts = TokenCounts.from_prompts(prompts, V)
    for step in range(2):
        counts.update(generated[:, step])
    ours = process_logits(x, _tensors([SamplingParams(temperature=0, repetition_penalty=1.3)] * 2), counts)
    for row in range(2):
        seq = torch.tensor([prompts[row] + generated[row].tolist()])
        ref = RepetitionPenaltyLogitsProcessor(1.3)(seq, x[row : row + 1].clone())
        _same(ours[row : row + 1], ref)


def test_presence_frequency_penalties_match_a_float64_loop():
    x = _logits(B=2)
    generated = [[3, 3, 3, 8], [8]]
    counts = TokenCounts.from_prompts([[3, 11], [20]], V)
    for step in range(4):
        tokens = torch.tensor([generated[0][step], generated[1][min(step, 0)]])
        counts.update(tokens, active=torch.tensor([True, step == 0]))
    params = [SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(temperature=0, presence_penalty=-1.0, frequency_penalty=1.5)]
    ours = process_logits(x, _tensors(params), counts)
    ref = x.double().clone()
    for row, p in enumerate(params):
        for token in range(V):
            c = generated[row].count(token)  # prompt tokens do not count (vLLM/OpenAI)
            ref[row, token] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    _same(ours, ref)


def test_logit_bias_banned_ids_and_min_tokens():
    from transformers import MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor

    x = _logits(B=1)
    params = SamplingParams(temperature=0, logit_bias={4: 5.0, 7: -2.5}, banned_token_ids=[9, 10],
                            min_tokens=2, stop_token_ids=[13])
    counts = TokenCounts.from_prompts([[1, 1]], V)
    counts.update(torch.tensor([5]))
    ours = process_logits(x, _tensors([params]), counts)
    ref = x.double().clone()
    ref[0, 4] += 5.0
    ref[0, 7] -= 2.5
    ids = torch.tensor([[1, 1, 5]])
    ref = NoBadWordsLogitsProcessor([[9], [10]], eos_token_id=2)(ids, ref)
    ref = MinNewTokensLengthLogitsProcessor(2, 2, [2, 13])(ids, ref)
    _same(ours, ref)
    counts.update(torch.tensor([6]))  # 2 generated: EOS and stop ids are allowed again
    after = process_logits(x, _tensors([params]), counts)
    assert not torch.isinf(after[0, [2, 13]]).any()
    ignoring = process_logits(x, _tensors([params.replace(ignore_eos=True)]), TokenCounts(
        counts.prompt_seen, counts.output_counts * 0, counts.num_generated * 0))
    assert torch.isinf(ignoring[0, 13]) and not torch.isinf(ignoring[0, 2])


def test_rows_keep_their_own_parameters():
    """A batch with different options per row equals each row processed alone."""
    x = _logits(B=4)
    params = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(top_p=0.6, min_p=0.1),
              SamplingParams(temperature=0), SamplingParams(temperature=1.7, repetition_penalty=1.2)]
    counts = TokenCounts.from_prompts([[1], [2, 3], [4], [5, 6, 7]], V)
    batched = process_logits(x, _tensors(params), counts)
    for row, p in enumerate(params):
        alone = process_logits(x[row : row + 1], _tensors([p]), counts.select([row]))
        _same(batched[row : row + 1], alone)


def test_selected_rows_with_their_params_equal_fresh_tensors():
    """Rows kept after others left (the engine's steady batches) switch off what only the leavers used."""
    params = [SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.3, min_tokens=2, logit_bias={4: 2.0}),
              SamplingParams(top_p=0.6), SamplingParams(temperature=0, banned_token_ids=[7])]
    kept = [2, 1]
    selected = _tensors(params).select(kept, params=[params[i] for i in kept])
    fresh = _tensors([params[i] for i in kept])
    assert (selected.stop_ids, selected.logit_bias, fresh.stop_ids, fresh.logit_bias) == (None,) * 4
    for name in ("max_top_k", "do_top_p", "do_min_p", "do_repetition", "do_presence_frequency", "all_greedy"):
        assert getattr(selected, name) == getattr(fresh, name), name
    assert not selected.do_repetition and selected.max_top_k == 0 and selected.do_top_p
    x = _logits(B=2)
    _same(process_logits(x, selected), process_logits(x, fresh))
    # without params the switches stay as they were (duplicating rows keeps every processor)
    assert _tensors(params).select(kept).do_repetition


def test_temperature_zero_is_greedy_and_ignores_filters():
    x = _logits(B=2)
    t = _tensors([SamplingParams(temperature=0, top_k=1, top_p=0.1), SamplingParams(temperature=0)])
    assert torch.equal(sample(process_logits(x, t), t), x.argmax(-1))


def test_sampling_distribution_matches_softmax():
    """Exponential-race sampling draws from softmax(logits / T) (chi-square style bound)."""
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    t = SamplingTensors.from_params([SamplingParams(temperature=0.8, seed=0)], 5)
    n = 20000
    rows = t.select([0] * n)
    rows.generators = [None] * n
    torch.manual_seed(0)
    tokens = sample(process_logits(x.expand(n, 5), rows), rows)
    freq = torch.bincount(tokens, minlength=5).double() / n
    expected = torch.softmax(x[0].double() / 0.8, -1)
    assert (freq - expected).abs().max() < 0.015


def test_seeded_rows_do_not_depend_on_the_batch():
    x = _logits(B=3)
    p = SamplingParams(temperature=1.0, seed=123)

    def run(params, row):
        t = _tensors(params)
        out = []
        for _ in range(5):
            out.append(sample(process_logits(x[:1].expand(len(params), V), t), t)[row].item())
        return out

    alone = run([p], 0)
    assert run([SamplingParams(temperature=1.0), p, SamplingParams(temperature=0.3, seed=9)], 1) == alone
    assert run([p.replace(seed=124)], 0) != alone


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.1, "temperature=-0.1 must be >= 0"),
    ("top_p", 0.0, r"top_p=0.0 must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p=1.5 must be in \(0, 1\]"),
    ("top_k", -3, "top_k=-3"),
    ("min_p", 1.5, "min_p=1.5"),
    ("repetition_penalty", 0.0, "repetition_penalty=0.0"),
    ("max_tokens", -1, r"max_tokens=-1 must be an integer >= 0 \(0: score the prompt only"),
    ("logprobs", 50, "logprobs=50"),
])
def test_invalid_options_are_clear_errors(field, value, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**{field: value}).validate(V)


def test_all_tokens_banned_is_a_clear_error():
    with pytest.raises(ConfigError, match="ban every token of the vocabulary"):
        _tensors([SamplingParams(banned_token_ids=list(range(V)))])
    with pytest.raises(ConfigError, match="blocks every token"):
        _tensors([SamplingParams(banned_token_ids=list(range(3, V)), stop_token_ids=[0, 1], min_tokens=1)])
    with pytest.raises(ConfigError, match=rf"banned_token_ids=\[{V}\] holds token id {V}, outside the vocabulary"):
        _tensors([SamplingParams(banned_token_ids=[V])])
    for field, value in (("stop_token_ids", [2, V + 5]), ("logit_bias", {V: 1.0})):  # the option is named
        with pytest.raises(ConfigError, match=rf"^{field}=.* holds token id {V + 5 if field == 'stop_token_ids' else V}"):
            SamplingParams(**{field: value}).validate(V)


def test_generation_config_max_tokens_aliases():
    from lmstack.infer import GenerationConfig

    c = GenerationConfig(max_new_tokens=10)
    assert c.max_tokens == 10
    assert c.replace(max_tokens=5).max_new_tokens == 5 and c.replace(max_new_tokens=7).max_tokens == 7

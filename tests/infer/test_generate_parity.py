"""Greedy and beam search equal transformers' generate() token for token, for every family."""

import pytest
import torch
from hf_models import FAMILIES, VOCAB, hf_model

import lmstack
from lmstack.infer import GenerationConfig, generate


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    ref = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    model, _ = lmstack.load(path)
    return ref, model.eval()


def _prompts(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 3, 11)]


def _hf(ref, prompts, eos, **kw):
    """transformers' generate on the same left-padded batch: the generated ids per row up to and
    including the first EOS, and transformers' whole output (for sequences_scores).

    Finished rows are padded with the EOS id itself (pad_token_id=eos): a row never holds a token
    after its first EOS, so cutting there cannot drop a generated token (0, transformers' usual
    pad here, is a real token; an id outside the vocabulary would be fed to the model by greedy
    search's finished rows)."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                           return_dict_in_generate=True, output_scores=True, **kw)
    rows = []
    for row in out.sequences[:, T:].tolist():
        length = row.index(eos) + 1 if eos in row else len(row)
        assert set(row[length:]) <= {eos}, f"a token after EOS: {row}"
        rows.append(row[:length])
    return rows, out


def test_greedy_matches_transformers(pair):
    ref, model = pair
    prompts = _prompts()
    # an EOS the model actually emits, so early stops are exercised too
    probe = generate(model, prompts[0], GenerationConfig(max_new_tokens=4, eos_token_ids=[]))[0]
    eos = probe.outputs[0].token_ids[2]
    expected, _ = _hf(ref, prompts, eos, max_new_tokens=12)
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_ids=[eos]))
    for row, out in enumerate(ours):
        assert out.outputs[0].token_ids == expected[row]
        finished_early = eos in out.outputs[0].token_ids
        assert out.outputs[0].finish_reason == ("stop" if finished_early else "length")


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [
    (3, 1.0, False), (4, 0.5, True), (3, 2.0, "never"),
])
def test_beam_search_matches_transformers(pair, num_beams, length_penalty, early_stopping):
    ref, model = pair
    prompts = _prompts(1)[:2]
    probe = generate(model, prompts[0], GenerationConfig(max_new_tokens=3, eos_token_ids=[]))[0]
    eos = probe.outputs[0].token_ids[1]
    n = 2
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    expected, hf_out = _hf(ref, prompts, eos, max_new_tokens=8, num_return_sequences=n, **kw)
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=8, eos_token_ids=[eos], n=n, **kw))
    for b, out in enumerate(ours):
        for j in range(n):
            hf_tokens = expected[b * n + j]
            assert len(hf_tokens) == 8 or hf_tokens[-1] == eos  # a beam ends at EOS or at the limit
            got = out.outputs[j]
            assert got.token_ids == hf_tokens
            assert got.finish_reason == ("stop" if hf_tokens[-1] == eos else "length")
            # the beam's score, sum of log-probabilities / length ** length_penalty: measured within
            # 2.4e-6 of transformers' (scores down to -4.6) over every family and setting here
            assert abs(got.cumulative_logprob - hf_out.sequences_scores[b * n + j].item()) < 1e-5

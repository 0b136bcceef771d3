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


def _hf(ref, prompts, **kw):
    """transformers' generate on the same left-padded batch; returns generated ids per row."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)
    return out[:, T:].tolist()


def _trim(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_greedy_matches_transformers(pair):
    ref, model = pair
    prompts = _prompts()
    # an EOS the model actually emits, so early stops are exercised too
    probe = generate(model, prompts[0], GenerationConfig(max_new_tokens=4, eos_token_ids=[]))[0]
    eos = probe.outputs[0].token_ids[2]
    expected = _hf(ref, prompts, max_new_tokens=12, eos_token_id=eos)
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_ids=[eos]))
    for row, out in enumerate(ours):
        assert out.outputs[0].token_ids == _trim(expected[row], eos)
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
    expected = _hf(ref, prompts, max_new_tokens=8, eos_token_id=eos, num_return_sequences=n, **kw)
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=8, eos_token_ids=[eos], n=n, **kw))
    for b, out in enumerate(ours):
        for j in range(n):
            hf_tokens = _trim(expected[b * n + j], eos)
            got = out.outputs[j].token_ids
            assert got == hf_tokens[: len(got)] and (len(got) == len(hf_tokens) or set(hf_tokens[len(got):]) == {0})

"""An evaluation harness's log-likelihood request: token-id prompts, echo, logprobs, max_tokens 0 and 1.

This is the request lm-evaluation-harness sends to score a continuation (`local-completions`):
the prompt tokens' logprobs must be those of a full forward pass (here transformers'), and
`top_logprobs` must tell whether each token was the greedy choice.
"""

import math

import pytest
from serve_helpers import reference_logprobs


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_of_token_id_prompts_match_a_forward_pass(http, hf_reference, max_tokens):
    model, tok = hf_reference
    prompts = [tok.encode("The quick brown fox jumps over the lazy dog").ids, [7, 100, 3, 250, 42, 42, 9]]
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 1,
                                           "max_tokens": max_tokens, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 2
    for ids, choice in zip(prompts, body["choices"]):
        lp = choice["logprobs"]
        n_out = len(lp["tokens"]) - len(ids)
        assert n_out == max_tokens
        ref = reference_logprobs(model, ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for i in range(1, len(ids)):
            expected = ref[i - 1, ids[i]].item()
            assert math.isclose(lp["token_logprobs"][i], expected, abs_tol=1e-4), (i, lp["token_logprobs"][i], expected)
            top = lp["top_logprobs"][i]
            greedy = int(ref[i - 1].argmax())
            is_greedy = greedy == ids[i]
            # lm-eval's is_greedy test: the token's logprob is the best one in top_logprobs
            assert (max(top.values()) <= lp["token_logprobs"][i] + 1e-6) == is_greedy or \
                tok.decode([greedy]) == tok.decode([ids[i]])
            assert math.isclose(max(top.values()), ref[i - 1].max().item(), abs_tol=1e-4)
        assert choice["text"].startswith(tok.decode(ids, skip_special_tokens=False))
        if max_tokens == 1:
            generated = int(ref[-1].argmax())
            assert math.isclose(lp["token_logprobs"][-1], ref[-1, generated].item(), abs_tol=1e-4)
            assert lp["tokens"][-1] == tok.decode([generated])
        else:
            assert choice["text"] == tok.decode(ids, skip_special_tokens=False)
        assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2 * max_tokens
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)


def test_echo_with_the_openai_client_and_text_prompt(client, hf_reference):
    model, tok = hf_reference
    text = "Hello world! Serving models"
    ids = tok.encode(text).ids
    out = client.completions.create(model="tiny", prompt=text, echo=True, logprobs=0, max_tokens=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == text and lp.tokens == [tok.decode([t]) for t in ids]
    ref = reference_logprobs(model, ids)
    total = sum(lp.token_logprobs[1:])
    assert math.isclose(total, sum(ref[i - 1, ids[i]].item() for i in range(1, len(ids))), abs_tol=1e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]

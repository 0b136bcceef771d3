"""The official `openai` client against a live server on the real engine (tiny random Llama).

Greedy outputs and log-probabilities are checked against transformers on the same weights,
token counts against the `tokenizers` library, chat prompts against transformers' template.
"""

import math
import time

import openai
import pytest
import torch
from serve_helpers import API_KEY, reference_greedy, reference_logprobs

PROMPT = "The quick brown fox"


def test_completion_matches_transformers_greedy(client, hf_reference):
    model, tok = hf_reference
    ids = tok.encode(PROMPT).ids
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == "tiny"
    assert abs(out.created - time.time()) < 120
    [choice] = out.choices
    expected = reference_greedy(model, ids, 12)
    assert choice.text == tok.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == "length" and choice.index == 0
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_streamed_completion_equals_unstreamed(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1, "the reply should arrive in several chunks"
    assert "".join(c.choices[0].text for c in text_chunks) == full
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert len({c.id for c in chunks}) == 1


def test_n_samples_seeded_and_streamed(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, n=3, seed=7)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices], "a seeded request must be reproducible"
    assert len({c.text for c in a.choices}) > 1, "the n samples should differ"
    assert a.usage.completion_tokens == 30
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_several_prompts_give_n_choices_each(client, hf_reference):
    model, tok = hf_reference
    texts = ["Hello world", "the lazy dog"]
    id_lists = [tok.encode(t).ids for t in texts] + [[5, 17, 42, 99]]
    for prompts, ids in ((texts, id_lists[:2]), (id_lists, id_lists)):
        out = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, n=2)
        assert [c.index for c in out.choices] == list(range(2 * len(ids)))
        for i, p in enumerate(ids):
            expected = tok.decode(reference_greedy(model, p, 5), skip_special_tokens=True)
            assert out.choices[2 * i].text == out.choices[2 * i + 1].text == expected
        assert out.usage.prompt_tokens == sum(len(p) for p in ids)
        assert out.usage.completion_tokens == 10 * len(ids)


def test_completion_logprobs_match_a_forward_pass(client, hf_reference):
    model, tok = hf_reference
    ids = tok.encode(PROMPT).ids
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    generated = reference_greedy(model, ids, 6)
    ref = reference_logprobs(model, ids + generated)
    assert lp.tokens == [tok.decode([t]) for t in generated]
    for i, token_id in enumerate(generated):
        row = ref[len(ids) - 1 + i]
        assert math.isclose(lp.token_logprobs[i], row[token_id].item(), abs_tol=1e-4)
        top = lp.top_logprobs[i]
        assert len(top) <= 4 and lp.tokens[i] in top
        best = torch.topk(row, 3)
        names = [tok.decode([t]) for t in best.indices.tolist()]
        for name, value in zip(names, best.values.tolist()):
            if names.count(name) == 1:  # distinct ids that decode alike (partial UTF-8) share a key
                assert math.isclose(top[name], value, abs_tol=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def _stop_candidate(text: str) -> str:
    for k in range(len(text) // 2, len(text) - 3):
        s = text[k:k + 3]
        if "\ufffd" not in s and s.strip() and text.find(s) > 0:
            return s
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_strings_cut_the_text(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    stop = _stop_candidate(text)
    out = client.completions.create(**kwargs, stop=[stop, "never-appears-xyz"])
    assert out.choices[0].text == text[: text.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stop=stop, stream=True)
                       if c.choices)
    assert streamed == text[: text.find(stop)]
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=40, temperature=0)
    reply = client.chat.completions.create(**chat).choices[0].message.content
    stop = _stop_candidate(reply)
    cut = client.chat.completions.create(**chat, stop=stop).choices[0]
    assert cut.message.content == reply[: reply.find(stop)] and cut.finish_reason == "stop"


def test_chat_uses_the_template_and_matches_completions(client, tiny_dir):
    import transformers

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    out = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 10
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert choice.message.content == plain.choices[0].text


def test_chat_stream_logprobs_and_n(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12,
                  temperature=0, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kwargs)
    content = full.choices[0].message.content
    entries = full.choices[0].logprobs.content
    assert len(entries) == 12
    raw = b"".join(bytes(e.bytes) for e in entries)
    assert raw.decode("utf-8", errors="replace") == content, "token bytes must add up to the text"
    for e in entries:
        assert len(e.top_logprobs) == 2 and math.isclose(e.top_logprobs[0].logprob, e.logprob, abs_tol=1e-5)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    multi = client.chat.completions.create(model="tiny", messages=kwargs["messages"], max_tokens=8, n=2, seed=3,
                                           temperature=1.0)
    assert [c.index for c in multi.choices] == [0, 1] and multi.usage.completion_tokens == 16


def test_models_and_aliases(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    out = client.completions.create(model="tiny-alias", prompt="Hi", max_tokens=2)
    assert out.model == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and "gpt-4" in err.value.body["message"]


def test_embeddings_are_mean_pooled_hidden_states(client, hf_reference):
    model, tok = hf_reference
    texts = ["Hello world", "the lazy dog jumps"]
    out = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 by default
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    assert out.usage.prompt_tokens == sum(len(tok.encode(t).ids) for t in texts)
    for i, text in enumerate(texts):
        with torch.no_grad():
            hidden = model(torch.tensor([tok.encode(text).ids]), output_hidden_states=True).hidden_states[-1][0]
        ref = torch.nn.functional.normalize(hidden.double().mean(0), dim=0)
        for data in (out.data[i], floats.data[i]):
            got = torch.tensor(data.embedding, dtype=torch.float64)
            assert data.index == i and got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_tokenize_and_detokenize(http, hf_reference):
    _, tok = hf_reference
    r = http.post("/tokenize", json={"prompt": PROMPT})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(PROMPT).ids
    assert r.json()["count"] == len(tok.encode(PROMPT).ids) and r.json()["max_model_len"] == 256
    r = http.post("/detokenize", json={"tokens": tok.encode(PROMPT).ids})
    assert r.json() == {"prompt": PROMPT}
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert tok.decode(r.json()["tokens"], skip_special_tokens=False) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_api_key_is_required(server):
    import httpx

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi"}, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "authentication_error"
    with openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open


def test_sse_events_survive_unicode_line_separators(server, client):
    """Text may hold U+2028/U+0085, which str.splitlines() (httpx's iter_lines) splits a line at."""
    import json

    import httpx

    prompt = "Hi\u2028there\x85now\u2029"  # echoed back in the first event
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "stream": True, "echo": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    events = [json.loads(line[6:]) for line in lines]
    assert events[0]["choices"][0]["text"] == prompt
    streamed = "".join(c.choices[0].text for c in client.completions.create(**body) if c.choices)
    assert streamed.startswith(prompt)

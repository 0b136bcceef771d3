"""Edge cases of request bodies: cross-field checks, lone surrogates, odd JSON, prompt_logprobs,
huge prompts that must not stall the event loop, and small OpenAI-compatibility routes.

Bodies are sent as raw bytes where the JSON itself is the point (a `\\ud800` escape, `NaN`,
nesting 100000 levels deep), so the server parses exactly what a client could send.
"""

import json
import math
import threading
import time

import httpx
import pytest
import torch
from serve_helpers import API_KEY, LiveServer, api_error, reference_logprobs

from lmstack.errors import TokenizerError
from lmstack.serve import ServeConfig, create_app

CHAT = [{"role": "user", "content": "Hi"}]


def _raw(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers={"Content-Type": "application/json"})


# ---- 1. cross-field checks keep their own message -----------------------------------------------

@pytest.mark.parametrize("path,body,message,param", [
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, "top_logprobs needs logprobs=true",
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "continue_final_message": True},
     "needs add_generation_prompt=false", "continue_final_message"),
    ("/tokenize", {}, "give exactly one of prompt or messages", None),
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, "give exactly one of prompt or messages", None),
])
def test_cross_field_errors_keep_their_message(http, path, body, message, param):
    err = api_error(http.post(path, json=body), 400)
    assert message in err["message"] and err["code"] == "invalid_value" and err["param"] == param, err
    assert "JSON object" not in err["message"]


def test_a_body_that_is_not_an_object_is_still_invalid_type(http):
    for body in (b"[1, 2]", b'"hi"', b"3"):
        err = api_error(_raw(http, "/tokenize", body), 400)
        assert err["code"] == "invalid_type" and "must be a JSON object" in err["message"]


# ---- 2. lone surrogates -------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,param,index", [
    ("/v1/completions", b'{"prompt": "ab\\ud800c", "max_tokens": 1}', "prompt", 2),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt", 0),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\ud800"}]}', "messages", 1),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', "messages", 0),
    ("/v1/embeddings", b'{"input": "\\ud800"}', "input", 0),
    ("/v1/embeddings", b'{"input": ["fine", "x\\udc00"]}', "input", 1),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt", 0),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages", 0),
])
def test_lone_surrogates_are_400_naming_the_field(http, path, body, param, index):
    err = api_error(_raw(http, path, body), 400)
    assert err["code"] == "invalid_value" and err["param"] == param, err
    assert "is not valid Unicode text (a lone surrogate \\u" in err["message"]
    assert f"at index {index})" in err["message"]


def test_a_tokenizer_error_is_400_naming_the_field(engine):
    """Whatever the tokenizer refuses (lmstack's TokenizerError) is the client's 400, not a 500."""

    class Refusing:
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def encode(self, text, add_special_tokens=False):
            if "REFUSE" in text:
                raise TokenizerError("this text is not valid Unicode: lone surrogate (test)")
            return self.tok.encode(text, add_special_tokens=add_special_tokens)

    app = create_app(engine, tokenizer=Refusing(engine.tokenizer), config=ServeConfig(model_names=["tiny"]))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        for path, body, param in [("/v1/completions", {"prompt": "REFUSE", "max_tokens": 1}, "prompt"),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "REFUSE"}]},
                                   "messages"),
                                  ("/v1/embeddings", {"input": "REFUSE"}, "input"),
                                  ("/tokenize", {"prompt": "REFUSE"}, "prompt")]:
            err = api_error(c.post(path, json=body), 400)
            assert err["code"] == "invalid_value" and err["param"] == param and "not valid Unicode" in err["message"]
        assert c.post("/v1/completions", json={"prompt": "fine", "max_tokens": 1}).status_code == 200


# ---- 3. prompt_logprobs -------------------------------------------------------------------------

@pytest.mark.parametrize("echo", [False, True])
def test_prompt_logprobs_match_a_forward_pass(http, hf_reference, echo):
    model, tok = hf_reference
    ids = tok.encode("The quick brown fox jumps over the lazy dog").ids
    body = {"prompt": ids, "prompt_logprobs": 2, "max_tokens": 1, "temperature": 0, "echo": echo}
    if echo:
        body["logprobs"] = 2
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    ref = reference_logprobs(model, ids)
    for i in range(1, len(ids)):
        entry = plp[i]
        mine = entry[str(ids[i])]
        assert math.isclose(mine["logprob"], ref[i - 1, ids[i]].item(), abs_tol=1e-4), (i, mine)
        assert mine["decoded_token"] == tok.decode([ids[i]])
        top2 = ref[i - 1].topk(2)
        for rank, (value, tid) in enumerate(zip(top2.values.tolist(), top2.indices.tolist()), start=1):
            assert entry[str(tid)]["rank"] == rank
            assert math.isclose(entry[str(tid)]["logprob"], value, abs_tol=1e-4)
        assert set(entry) <= {str(ids[i])} | {str(t) for t in top2.indices.tolist()}
        if ids[i] not in top2.indices.tolist():
            assert mine["rank"] is None
    plain = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1}).json()["choices"][0]
    assert plain["prompt_logprobs"] is None


def test_prompt_logprobs_are_refused_where_they_cannot_be_given(http):
    err = api_error(http.post("/v1/chat/completions", json={"messages": CHAT, "prompt_logprobs": 1}), 400)
    assert err["code"] == "unsupported_parameter" and err["param"] == "prompt_logprobs"
    err = api_error(http.post("/v1/completions", json={"prompt": "Hi", "prompt_logprobs": 1, "stream": True}), 400)
    assert err["code"] == "unsupported_parameter" and err["param"] == "prompt_logprobs"


# ---- 4. huge prompts do not block the event loop ------------------------------------------------

HUGE = 1_000_000  # characters: only the test's own multi-megabyte prompts are this long


def _huge(texts) -> bool:
    return any(len(t) >= HUGE for t in ([texts] if isinstance(texts, str) else texts))


def test_health_answers_while_a_multi_megabyte_prompt_is_tokenized(server, http, monkeypatch):
    """The tokenizer is held (on an Event) while it has the huge prompt: the server must still answer.

    Were the prompt tokenized on the event loop, the held tokenizer would block the loop and the
    probes below would time out.
    """
    big = "The quick brown fox, jumps! " * 110_000  # ~3 MB, no context limit on /tokenize
    tok = server.state.tokenizer
    entered, release, threads = threading.Event(), threading.Event(), []

    def held(original):
        def method(texts, *args, **kwargs):
            if _huge(texts):
                threads.append(threading.get_ident())
                entered.set()
                if not release.wait(60):
                    raise RuntimeError("the test never released the tokenizer")
            return original(texts, *args, **kwargs)
        return method

    for name in ("encode", "encode_batch"):
        monkeypatch.setattr(tok, name, held(getattr(tok, name)))
    result = {}

    def tokenize():
        result["r"] = http.post("/tokenize", json={"prompt": big})

    worker = threading.Thread(target=tokenize)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not entered.wait(0.05):  # the body is in and the tokenizer has it
            if not worker.is_alive():
                r = result.get("r")
                pytest.fail(f"the request ended without tokenizing the prompt: {r and (r.status_code, r.text[:300])}")
            assert time.monotonic() < deadline, "the tokenizer was never called with the prompt"
        with httpx.Client(base_url=server.url, headers=http.headers, timeout=15) as c:  # timeout: a hang guard
            for _ in range(3):
                assert c.get("/health").status_code == 200
            r = c.post("/tokenize", json={"prompt": "Hello world"})
            assert r.status_code == 200 and r.json()["count"] > 0, r.text
        assert worker.is_alive() and not result, "the huge request finished while its tokenizer was held"
    finally:
        release.set()
        worker.join(60)
    assert not worker.is_alive()
    assert result["r"].status_code == 200 and result["r"].json()["count"] > 100_000
    assert threads and server.thread.ident not in threads, "the prompt was tokenized on the event loop's thread"


@pytest.mark.parametrize("path,key", [("/v1/completions", "prompt"), ("/v1/embeddings", "input")])
def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server, http, monkeypatch, path, key):
    big = "The quick brown fox, jumps! " * 250_000  # 7 MB: tokenizing it would take seconds
    tok = server.state.tokenizer
    tokenized = []

    def refusing(original):
        def method(texts, *args, **kwargs):
            if _huge(texts):
                tokenized.append(path)
                raise RuntimeError("the test's huge prompt reached the tokenizer")
            return original(texts, *args, **kwargs)
        return method

    for name in ("encode", "encode_batch"):
        monkeypatch.setattr(tok, name, refusing(getattr(tok, name)))
    r = http.post(path, json={key: big})  # the client's 60 s timeout is only a hang guard
    assert not tokenized, "the prompt was tokenized before it was refused"
    err = api_error(r, 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == key


def test_the_character_bound_never_refuses_a_prompt_that_fits(server):
    texts = server.state.texts
    per_token = texts.max_chars_per_token()
    assert per_token is not None
    tok = server.state.tokenizer
    for text in ("The quick brown fox jumps over the lazy dog. " * 3, "é€𝄞 ü" * 10, "<|im_start|>" * 5, " " * 500):
        assert len(text) <= len(tok.encode(text)) * per_token


# ---- 5. max_tokens 0 at the edge of the context -------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_scores_a_prompt_as_long_as_the_context(http, server, hf_reference, stream):
    """What evaluation harnesses send for a full window (echo, logprobs, max_tokens=0): exact."""
    model, _ = hf_reference
    limit = server.state.engine.max_model_len
    ids = [(7 * i) % 300 for i in range(limit)]
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": stream}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        lp = chunks[0]["choices"][0]["logprobs"]
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]
        assert chunks[1]["choices"][0]["text"] == ""
    else:
        choice = r.json()["choices"][0]
        lp, usage = choice["logprobs"], r.json()["usage"]
        assert choice["finish_reason"] == "length"
        assert usage == {"prompt_tokens": limit, "completion_tokens": 0, "total_tokens": limit}
    assert len(lp["tokens"]) == limit and lp["token_logprobs"][0] is None
    ref = reference_logprobs(model, ids)
    got = torch.tensor(lp["token_logprobs"][1:], dtype=torch.float64)
    want = ref[torch.arange(limit - 1), torch.tensor(ids[1:])]
    assert (got - want).abs().max().item() < 1e-4
    # one token more than the context, or any generation on a full context, cannot be served: say why
    err = api_error(http.post("/v1/completions", json={**body, "prompt": ids + [5], "stream": False}), 400)
    assert err["code"] == "context_length_exceeded" and "more than it can hold" in err["message"]
    err = api_error(http.post("/v1/completions", json={**body, "max_tokens": 1, "stream": False}), 400)
    assert err["code"] == "context_length_exceeded" and "max_tokens=0 scores a prompt as long as" in err["message"]


# ---- 6. malformed bodies ------------------------------------------------------------------------

@pytest.mark.parametrize("body,reason", [
    (b'{"prompt": "a\xff\xfeb"}', "not valid UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}", "too many digits"),
])
def test_malformed_json_is_invalid_json_with_a_reason(http, body, reason):
    err = api_error(_raw(http, "/v1/completions", body), 400)
    assert err["code"] == "invalid_json" and reason in err["message"], err


# ---- 7. small things ----------------------------------------------------------------------------

def test_models_retrieve_and_head_health(server, client):
    assert client.models.retrieve("tiny").id == "tiny"
    assert client.models.retrieve("tiny-alias").max_model_len == server.state.engine.max_model_len
    r = httpx.get(server.url + "/v1/models/nope", headers={"Authorization": f"Bearer {API_KEY}"})
    err = api_error(r, 404)
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/v1/models/tiny").status_code == 401  # behind the key like /v1/models
    assert httpx.head(server.url + "/health").status_code == 200


@pytest.mark.parametrize("body,param,needle", [
    (b'{"prompt": [-1, 2]}', "prompt", "token id -1 is outside the vocabulary"),
    (b'{"prompt": [[3, 4], [5, -7]]}', "prompt", "token id -7 is outside the vocabulary"),
    (b'{"prompt": [true, false]}', "prompt", "prompt"),
    (b'{"prompt": "Hi", "temperature": NaN}', "temperature", "finite number"),
    (b'{"prompt": "Hi", "top_p": Infinity}', "top_p", "finite number"),
    (b'{"prompt": "Hi", "logit_bias": {"' + b"1" * 5000 + b'": 1}}', "logit_bias", "logit_bias"),
    (b'{"prompt": "Hi", "logit_bias": {"' + b"1" * 4000 + b'": 1}}', "logit_bias", "logit_bias"),
    (b'{"prompt": "Hi", "model": "' + b"m" * 5000 + b'"}', "model", "does not exist"),
])
def test_odd_values_get_a_precise_short_message(http, body, param, needle):
    err = api_error(_raw(http, "/v1/completions", body), 404 if param == "model" else 400)
    assert err["param"] == param and needle in err["message"], err
    assert len(err["message"]) < 300, err["message"]
    assert "less than or equal" not in err["message"]


def test_detokenize_negative_ids(http):
    err = api_error(_raw(http, "/detokenize", b'{"tokens": [5, -1]}'), 400)
    assert err["param"] == "tokens" and "token id -1 is outside the vocabulary" in err["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_is_per_choice_as_vllm_reports_it(http, path):
    """Each chunk's usage: its choice's prompt and the tokens that choice has so far."""
    body = {"n": 2, "max_tokens": 3, "temperature": 0.8, "seed": 1, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if path == "/v1/completions":
        body["prompt"] = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25]]
    else:
        body["messages"] = [{"role": "user", "content": "Hi"}]
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    seen: dict[int, int] = {}
    prompt_of = {0: 9, 1: 9, 2: 6, 3: 6}
    for c in chunks[:-1]:
        for choice in c["choices"]:
            usage = c["usage"]
            if path == "/v1/completions":
                assert usage["prompt_tokens"] == prompt_of[choice["index"]]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert seen.get(choice["index"], 0) <= usage["completion_tokens"] <= 3
            seen[choice["index"]] = usage["completion_tokens"]
    assert set(seen.values()) == {3}  # each choice ends at its own 3 tokens, not the request's sum
    final = chunks[-1]["usage"]
    prompts = 15 if path == "/v1/completions" else final["prompt_tokens"]
    assert final["completion_tokens"] == 3 * len(seen) and final["prompt_tokens"] == prompts


def test_long_prompts_are_tokenized_with_encode_batch_which_releases_the_gil():
    """`tokenizers` holds the GIL through `encode` but not `encode_batch`: only the latter lets
    other requests run while megabytes are tokenized (the held-tokenizer test cannot see this)."""
    from lmstack.serve.params import _encode_long

    calls = []

    class Recording:
        def encode(self, text, add_special_tokens=True):
            calls.append("encode")
            return [1]

        def encode_batch(self, texts, add_special_tokens=True):
            calls.append(("encode_batch", len(texts), add_special_tokens))
            return [[1, 2]]

    assert _encode_long(Recording(), "x" * 10, add_special_tokens=False) == [1, 2]
    assert calls == [("encode_batch", 1, False)]


def test_tool_call_arguments_sent_as_json_strings_reach_the_template_as_objects():
    """OpenAI's clients send function.arguments as a JSON string; tool-use templates print an object
    (`{{ tool_call.arguments | tojson }}`): a string would be shown to the model double-encoded."""
    import jinja2

    from lmstack.serve.chat import messages_as_dicts
    from lmstack.serve.errors import APIError
    from lmstack.serve.protocol import ChatMessage

    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [ChatMessage(role="user", content=[{"type": "text", "text": "Weather?"}, {"type": "text", "text": "Now."}]),
                ChatMessage(role="assistant", content=None, tool_calls=[call])]
    dicts = messages_as_dicts(messages)
    assert dicts[0]["content"] == "Weather?\nNow."  # text parts on their own lines, as vLLM joins them
    assert dicts[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert call["function"]["arguments"] == '{"city": "Paris"}'  # the request itself is not changed
    shown = jinja2.Template("{{ (m.tool_calls[0].function.arguments) | tojson }}").render(m=dicts[1])
    assert shown == '{"city": "Paris"}'
    empty = ChatMessage(role="assistant", tool_calls=[{"function": {"name": "now", "arguments": ""}}])
    assert messages_as_dicts([empty])[0]["tool_calls"][0]["function"]["arguments"] == {}
    bad = ChatMessage(role="assistant", tool_calls=[{"function": {"name": "f", "arguments": "{city: Paris"}}])
    with pytest.raises(APIError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"):
        messages_as_dicts([messages[0], bad])

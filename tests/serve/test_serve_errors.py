"""Bad input, overload and misbehaving clients: the right status and OpenAI's error body, never a 500.

Also: a client that disconnects (streaming or not) or times out has its request aborted in
the engine, and every KV block comes back.
"""

import re
import threading
import time

import httpx
import pytest
from serve_helpers import API_KEY, LiveServer, api_error, wait_idle

from lmstack.serve import ServeConfig, ServeLimits, create_app

CHAT = [{"role": "user", "content": "Hi"}]


def test_an_unknown_model_is_404_as_openai_and_vllm_answer(http):
    """The openai client raises NotFoundError for it (code that falls back to another model catches that)."""
    for path, body in (("/v1/completions", {"prompt": "Hi", "model": "missing"}),
                       ("/v1/chat/completions", {"messages": CHAT, "model": "missing"}),
                       ("/v1/embeddings", {"input": "Hi", "model": "missing"})):
        err = api_error(http.post(path, json=body), 404)
        assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "model", "model_not_found")
        assert err["message"] == "the model 'missing' does not exist on this server; it serves ['tiny', 'tiny-alias']"


def test_tools_reach_the_template_with_tool_choice_none(http):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "tools": tools, "tool_choice": "none",
                                                "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"].get("tool_calls") is None
    for extra in ({"tool_choice": "auto"}, {"tools": [], "tool_choice": "auto"}, {"tools": []}):  # nothing to call
        r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **extra})
        assert r.status_code == 200, (extra, r.text)


@pytest.mark.parametrize("path,body,param,message", [
    ("/v1/completions", {"prompt": "Hi", "temperature": -0.5}, "temperature",
     r"^field 'temperature': Input should be greater than or equal to 0$"),
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, "temperature",
     r"^field 'temperature': Input should be a valid number"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 10_000}, "max_tokens",
     r"^max_tokens=10000 is beyond the context: the prompt has \d+ tokens and max_model_len is 256, "
     r"so max_tokens can be at most \d+$"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": -1}, "max_tokens",
     r"^field 'max_tokens': Input should be greater than or equal to 0$"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, "top_p", r"^field 'top_p': Input should be greater than 0$"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, "n", r"^field 'n': Input should be greater than or equal to 1$"),
    ("/v1/completions", {"prompt": "Hi", "n": 17}, "n", r"^n=17 is above this server's limit of 16 samples per prompt$"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs",
     r"^field 'logprobs': Input should be less than or equal to 20$"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["a"] * 40}, "stop",
     r"^stop has 40 strings; this server allows at most 32$"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"99999": 1}}, "logit_bias",
     r"^logit_bias token id 99999 is outside the vocabulary \[0, \d+\)$"),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [10**6]}, "stop_token_ids",
     r"^stop_token_ids entry 1000000 is outside the vocabulary \[0, \d+\)$"),
    ("/v1/completions", {"prompt": "Hi", "min_tokens": 50, "max_tokens": 5}, "min_tokens",
     r"^min_tokens=50 is larger than max_tokens=5$"),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, "best_of", r"^best_of=3 is not supported \(only best_of == n\)$"),
    ("/v1/completions", {"prompt": [1, -2]}, "prompt", r"token id -2 is outside the vocabulary \[0, \d+\)$"),
    ("/v1/completions", {"prompt": [[1, 2], [300000]]}, "prompt", r"^prompt\[1\]: token id 300000 is outside the vocabulary \[0, \d+\)$"),
    ("/v1/completions", {"prompt": {"text": "Hi"}}, "prompt",
     r"^field 'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists$"),
    ("/v1/completions", {"prompt": "word " * 300}, "prompt",
     r"^the prompt has \d+ tokens but this model's context \(max_model_len\) is 256 tokens, .*; shorten the prompt$"),
    ("/v1/completions", {}, "prompt", r"^missing required field 'prompt'$"),
    ("/v1/chat/completions", {"messages": []}, "messages", r"^field 'messages': List should have at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.0.role",
     r"^field 'messages\.0\.role': Input should be 'system', 'developer', 'user', 'assistant' or 'tool'$"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
     r"^field 'messages\.0\.content' must be a string or a list of \{'type': 'text', 'text': \.\.\.\} parts$"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 1000}, "max_completion_tokens",
     r"^max_completion_tokens=1000 is beyond the context: .* so max_completion_tokens can be at most \d+$"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, "top_logprobs",  # a cross-field check
     r"^top_logprobs needs logprobs=true$"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format",
     r"^response_format 'json_object' is not supported .*; use 'text'$"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice",
     r"^tool_choice 'required' is not supported: this server does not parse tool calls .*tool_choice='none'"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tool_choice", r"^tool_choice 'auto' is not supported: .*\(no tool_calls are returned\)"),  # auto: the default
    ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options",
     r"^stream_options is only allowed with stream=true$"),
    ("/v1/embeddings", {"input": []}, "input", r"^input is an empty list; give at least one text$"),
    ("/v1/embeddings", {"input": "Hi", "dimensions": 3}, "dimensions",
     r"^dimensions=3 is not supported: this model's embeddings have 64 dimensions$"),
    ("/detokenize", {"tokens": [10**7]}, "tokens", r"^token id 10000000 is outside the vocabulary \[0, \d+\)$"),
    ("/tokenize", {}, None, r"^give exactly one of prompt or messages$"),  # a cross-field check: no single field
])
def test_invalid_fields_are_400(http, path, body, param, message):
    err = api_error(http.post(path, json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert re.search(message, err["message"]), err["message"]


def test_malformed_bodies_are_400(http):
    for content in (b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'"just a string"'):
        err = api_error(http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"}), 400)
        assert err["code"] in ("invalid_json", "invalid_type", "missing_required_parameter")
    api_error(http.post("/v1/completions", content=b"prompt=Hi", headers={"Content-Type": "text/plain"}), 400)
    assert api_error(http.get("/v1/nothing"), 404)["type"] == "invalid_request_error"  # OpenAI's type for 404s
    api_error(http.delete("/v1/models"), 405)


def test_oversized_body_is_413(http):
    big = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    assert api_error(http.post("/v1/completions", content=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(10):
            yield b"a" * (1024 * 1024)
    assert http.post("/v1/completions", content=chunks()).status_code == 413


def test_full_queue_is_429_with_retry_after(server, http):
    admission = server.state.admission
    held = admission.acquire(admission.limits.max_waiting)  # as if the queue were full
    try:
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert api_error(r, 429)["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "stream": True})
        assert api_error(r, 429)["type"] == "rate_limit_error"
    finally:
        held.close()
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_503_while_loading_and_while_draining(server, http):
    with LiveServer(create_app(config=ServeConfig(model_names=["tiny"]))) as loading:
        assert api_error(httpx.get(loading.url + "/health"), 503)["message"].startswith("the model is still loading")
        r = httpx.post(loading.url + "/v1/completions", json={"prompt": "Hi"})
        assert api_error(r, 503)["code"] == "engine_unavailable" and "Retry-After" in r.headers
        assert "lmstack:engine_loading" in httpx.get(loading.url + "/metrics").text
    server.state.admission.draining = True
    try:
        assert api_error(httpx.get(server.url + "/health"), 503)["type"] == "service_unavailable_error"
        api_error(http.post("/v1/completions", json={"prompt": "Hi"}), 503)
    finally:
        server.state.admission.draining = False
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_streaming_disconnect_aborts_and_frees_blocks(server, engine):
    body = {"prompt": "Hi", "max_tokens": 240, "ignore_eos": True, "stream": True, "n": 4}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert engine.stats().kv_blocks_used > 0
    stats = wait_idle(engine)
    assert stats.num_running == 0 and stats.kv_blocks_used == 0
    assert server.state.admission.num_in_flight == 0 and server.state.admission.num_waiting == 0


def test_non_streaming_disconnect_aborts(server, engine):
    body = {"prompt": "Hi", "max_tokens": 240, "ignore_eos": True, "n": 16}
    before = engine.stats().requests_finished_total.get("abort", 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(5.0, read=0.3))
    stats = wait_idle(engine)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0
    assert stats.requests_finished_total.get("abort", 0) > before


def test_request_timeout_is_504_and_aborts(engine):
    config = ServeConfig(model_names=["tiny"], limits=ServeLimits(request_timeout=0.2))
    with LiveServer(create_app(engine, config=config)) as live:
        body = {"prompt": "Hi", "max_tokens": 240, "ignore_eos": True, "n": 16}
        r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
        err = api_error(r, 504)
        assert err["code"] == "request_timeout" and "--request-timeout" in err["message"]
        assert r.headers["x-should-retry"] == "false"  # the openai client would otherwise run it twice more
        import openai

        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=2)
        before = wait_idle(engine).requests_finished_total.get("abort", 0)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="tiny", prompt=body["prompt"], max_tokens=body["max_tokens"], n=body["n"],
                                      extra_body={"ignore_eos": True})
        aborted = wait_idle(engine).requests_finished_total.get("abort", 0) - before
        assert aborted == body["n"]  # its 16 samples ran once, not three times
        with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert '"request_timeout"' in events[-2] and events[-1] == "data: [DONE]"
    assert wait_idle(engine).kv_blocks_used == 0


def test_concurrent_clients_all_finish(server, engine):
    results = []

    def worker(i):
        r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                       json={"prompt": f"Hello {i}", "max_tokens": 20, "ignore_eos": True})
        results.append(r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else r.status_code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["length"] * 12
    assert wait_idle(engine).kv_blocks_used == 0


def _scrape(url: str) -> dict:
    """GET /metrics, parsed: {sample name: [samples]}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def _successes(samples: dict) -> float:
    return sum(s.value for s in samples.get("lmstack:request_success_total", []))


def test_metrics_are_prometheus_and_mirror_the_engine(server, http, engine):
    before = _successes(_scrape(server.url))
    http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
    with http.stream("POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "stream": True}) as r:
        assert list(r.iter_lines())[-2] == "data: [DONE]"
    # a request's metrics are recorded as it finishes (the success counter last), which may trail the
    # response the client has already read: poll until both requests are counted
    deadline = time.monotonic() + 10
    while _successes(samples := _scrape(server.url)) < before + 2:
        assert time.monotonic() < deadline, f"request_success_total stayed at {_successes(samples)}, want {before + 2}"
        time.sleep(0.02)
    for name in ("lmstack:time_to_first_token_seconds_count", "lmstack:inter_token_latency_seconds_count",
                 "lmstack:e2e_request_latency_seconds_count", "lmstack:request_queue_time_seconds_count",
                 "lmstack:time_per_output_token_seconds_count", "lmstack:num_requests_running",
                 "lmstack:num_requests_waiting", "lmstack:kv_cache_usage_perc", "lmstack:prompt_tokens_total",
                 "lmstack:generation_tokens_total", "lmstack:num_preemptions_total", "lmstack:prefix_cache_hits_total",
                 "lmstack:prefix_cache_queries_total", "lmstack:request_success_total"):
        assert name in samples, name
    assert samples["lmstack:time_to_first_token_seconds_count"][0].value >= 2
    assert samples["lmstack:generation_tokens_total"][0].value == engine.stats().generation_tokens_total
    reasons = {s.labels["finished_reason"] for s in samples["lmstack:request_success_total"]}
    assert "length" in reasons
    assert all(s.labels["model_name"] == "tiny" for s in samples["lmstack:kv_cache_usage_perc"])
    assert 0.0 <= samples["lmstack:kv_cache_usage_perc"][0].value <= 1.0


def test_request_too_big_for_the_kv_pool_is_400_before_streaming(tiny_dir):
    import asyncio

    from serve_helpers import tiny_engine

    small = tiny_engine(tiny_dir, num_blocks=4)  # 64 tokens of KV: a chat filling the 256-token context cannot fit
    try:
        with LiveServer(create_app(small, config=ServeConfig(model_names=["tiny"]))) as live:
            for stream in (False, True):
                r = httpx.post(live.url + "/v1/chat/completions", json={"messages": CHAT, "stream": stream})
                err = api_error(r, 400)
                assert "KV blocks" in err["message"] and err["code"] == "context_length_exceeded"
            ok = httpx.post(live.url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8})
            assert ok.status_code == 200
    finally:
        asyncio.run(small.shutdown())

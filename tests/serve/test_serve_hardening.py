"""Hardening: the key is checked before any body is read, slow bodies time out, connections are
bounded, long stop strings are refused, huge integers are not echoed in full."""

import asyncio
import json
import socket
import time
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import API_KEY, LiveServer, api_error

from lmstack.serve import ServeConfig, create_app
from lmstack.serve.admission import ServeLimits
from lmstack.serve.errors import APIError
from lmstack.serve.params import _stop, resolve_max_tokens, sampling_params


def _keyed_app(**limits):
    return create_app(None, config=ServeConfig(api_keys=[API_KEY], limits=ServeLimits(**limits)))


def _call_asgi(app, path, headers, method="POST"):
    """Call the app in-process; returns (status, headers, body, how often `receive` was called)."""
    received, sent = [], []

    async def receive():
        received.append(1)
        if len(received) > 1:  # the client stays connected
            await asyncio.Event().wait()
        return {"type": "http.request", "body": b'{"prompt": [[[[', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": app}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    is_json = dict(start["headers"]).get(b"content-type", b"").startswith(b"application/json")
    return start["status"], dict(start["headers"]), json.loads(body) if is_json and body else body, len(received)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize",
                                  "/detokenize", "/v1/no-such-route"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {API_KEY}"])
def test_the_key_is_checked_before_the_body_is_read(path, auth):
    headers = {"content-type": "application/json"} | ({} if auth is None else {"authorization": auth})
    status, response_headers, body, reads = _call_asgi(_keyed_app(), path, headers)
    assert status == 401 and response_headers[b"www-authenticate"] == b"Bearer"
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "authentication_error"
    expected = "missing API key: send it as 'Authorization: Bearer <key>'" if auth is None else "incorrect API key"
    assert body["error"]["message"] == expected
    assert reads == 0  # the body was never read, so never parsed


def test_with_the_key_the_body_is_read_and_parsed():
    status, _, body, reads = _call_asgi(_keyed_app(), "/v1/completions",
                                        {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert reads >= 1 and status == 400 and body["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("path", ["/health", "/metrics", "/openapi.json", "/docs", "/"])
def test_open_routes_stay_open(path):
    status, _, _, _ = _call_asgi(_keyed_app(), path, {}, method="GET")
    assert status != 401


def test_no_json_parsing_without_the_key(monkeypatch):
    """Through a live server: an unauthenticated malformed 8 MiB body is answered 401 without json.loads."""
    import starlette.requests

    calls = []
    original = starlette.requests.Request.json

    async def spy(self):
        calls.append(1)
        return await original(self)

    monkeypatch.setattr(starlette.requests.Request, "json", spy)
    with LiveServer(_keyed_app()) as live:
        body = b'{"prompt": ' + b"[" * (8 * 1024 * 1024 - 20)
        r = httpx.post(live.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=30)
        err = api_error(r, 401)
        assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert calls == []
        r = httpx.post(live.url + "/v1/completions", content=b'{"prompt": [[[[', timeout=30,
                       headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
        assert api_error(r, 400)["code"] == "invalid_json" and calls  # the spy does see parsing with the key


def test_a_slow_body_gets_408():
    with LiveServer(_keyed_app(body_timeout=1.0)) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"pro")
            start = time.monotonic()
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            elapsed = time.monotonic() - start
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), data
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and err["type"] == "timeout_error" and "--body-timeout" in err["message"]
        assert 0.8 < elapsed < 8
        # a body that arrives in time is unaffected
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "Hi"}, timeout=30,
                       headers={"authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 503  # no engine: the request got past the body deadline


def test_limit_concurrency_is_passed_to_uvicorn():
    from lmstack.serve.server import make_server

    server = make_server(_keyed_app(max_connections=7))
    assert server.config.limit_concurrency == 7
    assert make_server(_keyed_app()).config.limit_concurrency == 1024
    assert server.config.h11_max_incomplete_event_size == 16 * 1024


def test_connections_beyond_the_limit_get_503():
    with LiveServer(_keyed_app(max_connections=2)) as live:
        idle = [socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.3)
            r = httpx.get(live.url + "/health", timeout=10)
            assert r.status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(live.url + "/health", timeout=10).status_code == 503  # no engine, but served by the app
        assert "loading" in httpx.get(live.url + "/health", timeout=10).text


@pytest.mark.parametrize("bad", [{"body_timeout": 0}, {"body_timeout": float("inf")}, {"max_connections": 0},
                                 {"max_stop_chars": 0}])
def test_bad_limits_are_refused(bad):
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError):
        ServeLimits(**bad)


def _state(**limits):
    return SimpleNamespace(config=ServeConfig(limits=ServeLimits(**limits)),
                           engine=SimpleNamespace(max_model_len=256, vocab_size=320), texts=None)


def test_a_long_stop_string_is_refused():
    state = _state()
    assert _stop(state, ["a" * 1000, "b"]) == ["a" * 1000, "b"]
    with pytest.raises(APIError) as e:
        _stop(state, ["b", "a" * 1001])
    assert e.value.status == 400 and e.value.param == "stop"
    assert e.value.message == "stop[1] has 1001 characters; this server allows at most 1000 characters per stop string"
    with pytest.raises(APIError) as e:
        _stop(_state(max_stop_chars=5), "abcdef")
    assert e.value.message.startswith("stop has 6 characters") and "at most 5 characters" in e.value.message


def _request(**fields):
    base = dict(n=1, min_tokens=0, stop_token_ids=None, stop=None)
    return SimpleNamespace(**(base | fields))


@pytest.mark.parametrize("fields,param", [({"n": 10 ** 5000}, "n"), ({"min_tokens": 10 ** 5000}, "min_tokens"),
                                          ({"stop_token_ids": [10 ** 5000]}, "stop_token_ids")])
def test_huge_integers_are_not_echoed(fields, param):
    with pytest.raises(APIError) as e:
        sampling_params(_state(), _request(**fields), 10)
    assert e.value.param == param and len(e.value.message) < 300, e.value.message
    with pytest.raises(APIError) as e:
        resolve_max_tokens(_state(), 10, 10 ** 5000, "max_tokens")
    assert e.value.param == "max_tokens" and len(e.value.message) < 300, e.value.message

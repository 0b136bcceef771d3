"""Claims of docs/serving.md that no other test covers, checked through `lmstack serve` itself.

The CLI runs in-process (`lmstack.cli.main`) up to the point where uvicorn would start serving
(`LmstackServer.run` is replaced by a recorder), so every flag, the `LMSTACK_API_KEY`
environment variable and the bind-address warning go through the real command; the app it
built is then served on a loopback port by `LiveServer`. The second-signal test runs the real
command in a subprocess, since signals go to a process's main thread.
"""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from net_helpers import free_port
from serve_helpers import LiveServer, api_error

from lmstack.cli import main
from lmstack.serve.server import LmstackServer

WARNING = ("serving on {host} without an API key: anyone who can reach this address can use the model; "
           "pass --api-key or set LMSTACK_API_KEY")




def _run_cli(monkeypatch, *args):
    """`lmstack serve ARGS --port FREE` in-process, stopped where it would serve: (exit code, the app it built)."""
    built = []
    monkeypatch.setattr(LmstackServer, "run", lambda self, sockets=None: built.append(self.config.app))
    code = main(["serve", *args, "--port", str(free_port())])  # the CLI checks that it could bind the port
    return code, (built[0] if built else None)


def _wait_healthy(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll /health until 200 (failing with `proc`'s output if that server process exits first)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None:
            assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become healthy"
        time.sleep(0.05)


@contextlib.contextmanager
def _cli_server(tiny_dir, *args, env_key=None):
    """The app `lmstack serve TINY_DIR ARGS` builds (with LMSTACK_API_KEY=env_key, or unset), served and loaded."""
    with pytest.MonkeyPatch.context() as mp:
        if env_key is None:
            mp.delenv("LMSTACK_API_KEY", raising=False)
        else:
            mp.setenv("LMSTACK_API_KEY", env_key)
        code, app = _run_cli(mp, str(tiny_dir), "--device", "cpu", "--num-blocks", "128", "--served-model-name",
                             "tiny", "--log-level", "warning", *args)
    assert code == 0 and app is not None
    with LiveServer(app) as live:  # its lifespan runs the CLI's loader: the model loads in the background
        _wait_healthy(live.url)
        yield live


@pytest.fixture(scope="module")
def env_key_server(tiny_dir):
    """`lmstack serve` with no --api-key and two keys in LMSTACK_API_KEY; every other flag at its default."""
    with _cli_server(tiny_dir, env_key="env-key-1,env-key-2") as live:
        yield live


def _call(url: str, path: str, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if path == "/v1/models":
        return httpx.get(url + path, headers=headers, timeout=60)
    body = {"/v1/completions": {"prompt": "Hi", "max_tokens": 2}, "/tokenize": {"prompt": "Hi"},
            "/detokenize": {"tokens": [60, 61]}}[path]
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions", "/tokenize", "/detokenize"])
def test_the_key_from_lmstack_api_key_is_required(env_key_server, path):
    """docs/serving.md, Auth: the LMSTACK_API_KEY variable makes /v1/*, /tokenize and /detokenize
    require `Authorization: Bearer KEY`, as --api-key does (comma-separated: several keys)."""
    url = env_key_server.url
    err = api_error(_call(url, path, None), 401)
    assert err["code"] == "invalid_api_key" and err["message"] == "missing API key: send it as 'Authorization: Bearer <key>'"
    err = api_error(_call(url, path, "env-key-3"), 401)
    assert err["code"] == "invalid_api_key" and err["message"] == "incorrect API key"
    for key in ("env-key-1", "env-key-2"):
        r = _call(url, path, key)
        assert r.status_code == 200, (key, r.text)


def test_health_and_metrics_stay_open_with_an_environment_key(env_key_server):
    assert httpx.get(env_key_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(env_key_server.url + "/metrics").status_code == 200


def test_at_most_64_prompts_per_request_by_default(env_key_server):
    """docs/serving.md, Limits: --max-prompts (64 prompts or embedding inputs per request)."""
    with httpx.Client(base_url=env_key_server.url, headers={"Authorization": "Bearer env-key-1"}, timeout=120) as c:
        for prompt in (["Hi"] * 65, [[60, 61]] * 65):
            err = api_error(c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}), 400)
            assert (err["param"], err["code"]) == ("prompt", "invalid_value")
            assert err["message"] == "65 prompts in one request; this server allows at most 64"
        err = api_error(c.post("/v1/embeddings", json={"input": ["Hi"] * 65}), 400)
        assert err["param"] == "input" and err["message"] == "65 inputs in one request; this server allows at most 64"
        r = c.post("/v1/completions", json={"prompt": ["Hi"] * 64, "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 64
        r = c.post("/v1/embeddings", json={"input": ["Hi"] * 64})
        assert r.status_code == 200 and len(r.json()["data"]) == 64


def test_the_api_key_flag_wins_over_the_environment_and_max_prompts_is_a_flag(tiny_dir):
    """--api-key replaces LMSTACK_API_KEY (the variable is only its default); --max-prompts sets the limit."""
    with _cli_server(tiny_dir, "--api-key", "flag-key", "--max-prompts", "2", env_key="env-key-1") as live:
        api_error(_call(live.url, "/v1/models", "env-key-1"), 401)
        assert _call(live.url, "/v1/models", "flag-key").status_code == 200
        with httpx.Client(base_url=live.url, headers={"Authorization": "Bearer flag-key"}, timeout=60) as c:
            err = api_error(c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1}), 400)
            assert err["param"] == "prompt" and err["message"] == "3 prompts in one request; this server allows at most 2"
            assert c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("args,env_key,warned", [
    (["--host", "0.0.0.0"], None, True),
    (["--host", "0.0.0.0", "--api-key", "k1"], None, False),
    (["--host", "0.0.0.0"], "k1", False),  # a key from the environment counts
    ([], None, False),  # the default, 127.0.0.1
    (["--host", "localhost"], None, False),
], ids=["any-address", "flag-key", "env-key", "default-loopback", "localhost"])
def test_binding_beyond_loopback_without_a_key_logs_a_warning(monkeypatch, caplog, tiny_dir, args, env_key, warned):
    """docs/serving.md, Auth: the default bind address is 127.0.0.1; binding elsewhere without a key logs a warning."""
    if env_key is None:
        monkeypatch.delenv("LMSTACK_API_KEY", raising=False)
    else:
        monkeypatch.setenv("LMSTACK_API_KEY", env_key)
    caplog.set_level(logging.WARNING, logger="lmstack.serve")
    code, app = _run_cli(monkeypatch, str(tiny_dir), "--device", "cpu", "--num-blocks", "16", *args)
    assert code == 0 and app is not None
    warnings = [r.getMessage() for r in caplog.records if r.name == "lmstack.serve" and r.levelno >= logging.WARNING]
    host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
    assert warnings == ([WARNING.format(host=host)] if warned else [])


def test_a_second_signal_exits_at_once(tiny_dir):
    """docs/serving.md, shutdown: after SIGTERM the server waits (up to --shutdown-timeout) for in-flight
    requests; a second signal exits at once. The in-flight request is one whose body never finishes
    arriving, so only the second signal can end the wait before the 120 s timeout."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", str(tiny_dir), "--port", str(port),
                             "--num-blocks", "64", "--device", "cpu", "--log-level", "warning",
                             "--shutdown-timeout", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    client = None
    try:
        _wait_healthy(url, timeout=90, proc=proc)
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # 11 of the 100 bytes announced
        time.sleep(0.5)  # the server is now reading the body
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):  # draining: it waits for the in-flight request
            proc.wait(2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if client is not None:
            client.close()
    output = proc.stdout.read()
    assert code == 0, output
    assert took < 10, f"the second signal took {took:.1f} s to end the server"

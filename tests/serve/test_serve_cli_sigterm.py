"""`lmstack serve` as a user runs it: --help, bad directories, and a clean exit on SIGTERM.

The SIGTERM test runs the real command in a subprocess; the "abort what does not finish in
time" half of graceful shutdown runs in-process, where the engine's blocks can be inspected.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from net_helpers import free_port
from serve_helpers import LiveServer, wait_idle

from lmstack.serve import ServeConfig, create_app


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "lmstack.cli", *args], capture_output=True, text=True, timeout=120,
                          **kwargs)


def test_help_lists_the_flags():
    out = _cli("serve", "--help")
    assert out.returncode == 0
    for flag in ("--host", "--port", "--api_key", "--max_waiting", "--max_model_len", "--safety_config", "--kv_cache_dtype",
                 "--request_timeout", "--shutdown_timeout", "default: 127.0.0.1"):
        assert flag in out.stdout, flag


def test_bad_model_directory_is_a_clear_error(tmp_path):
    out = _cli("serve", str(tmp_path / "missing"))
    assert out.returncode == 2 and "is not a directory" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "config.json").write_text("{}")
    out = _cli("serve", str(tmp_path))
    assert out.returncode == 2 and "has no tokenizer.json" in out.stderr
    bad = tmp_path / "safety.yaml"
    bad.write_text("categories: {x: {patterns: ['(']}}")
    (tmp_path / "tokenizer.json").write_text("{}")
    out = _cli("serve", str(tmp_path), "--safety-config", str(bad))
    assert out.returncode == 2 and "is not a valid regular expression" in out.stderr
    out = _cli("serve", str(tmp_path), "--kv-cache-dtype", "int4")
    assert out.returncode == 2 and "--kv_cache_dtype 'int4' is not one of auto, fp8, fp8_e4m3" in out.stderr




def _start_server(tiny_dir, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """`lmstack serve` on a free port, healthy. The port is free when picked but the server binds it
    later (it refuses --port 0), so another process may take it meanwhile: then, and only then, the
    server is started again on a fresh port, a bounded number of times."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", str(tiny_dir), "--port", str(port),
                                 "--num-blocks", "128", "--device", "cpu", "--api-key", "k1,k2",
                                 "--served-model-name", "tiny", "--log-level", "warning"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
        deadline = time.monotonic() + 90
        try:
            while proc.poll() is None:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200 and proc.poll() is None:
                        return proc, url
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not become healthy"
                time.sleep(0.2)
        except BaseException:
            proc.kill()
            proc.wait(30)
            raise
        output = proc.stdout.read()
        if "address already in use" not in output.lower() or attempt == attempts:
            pytest.fail(f"lmstack serve exited with {proc.returncode} (attempt {attempt} of {attempts}):\n"
                        f"{output[-4000:]}")
    raise AssertionError("unreachable")


def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(tiny_dir, engine):
    proc, url = _start_server(tiny_dir)
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        events, started = [], threading.Event()

        def stream():
            body = {"prompt": "Hello", "max_tokens": 60, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer k2"},
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert proc.wait(60) == 0, "SIGTERM must end in a clean exit"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "[DONE]", "the in-flight request must be finished, not cut"
    finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finals[-1] == "length" and sum(len(json.loads(e)["choices"][0]["text"]) > 0 for e in events[:-1]) > 1
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_shutdown_aborts_what_does_not_finish_in_time(engine):
    live = LiveServer(create_app(engine, config=ServeConfig(model_names=["tiny"])), shutdown_timeout=0.3)
    lines = []
    with live:
        def stream():
            body = {"prompt": "Hi", "max_tokens": 250, "ignore_eos": True, "stream": True, "n": 16}
            try:
                with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
                    lines.extend(r.iter_lines())
            except httpx.TransportError:
                lines.append("<connection closed>")

        reader = threading.Thread(target=stream)
        reader.start()
        while not lines and reader.is_alive():
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while engine.stats().num_running == 0:
            assert time.monotonic() < deadline, (
                f"the engine never ran the streamed request in 30 s (the reader is alive: {reader.is_alive()}, "
                f"{len(lines)} lines read)")
            time.sleep(0.01)
    reader.join(30)
    assert "data: [DONE]" not in lines, "the request should have been cut by the shutdown timeout"
    stats = wait_idle(engine)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0
    assert not engine.core.requests

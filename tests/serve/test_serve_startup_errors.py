"""`lmstack serve` refuses bad options and broken model directories before it binds the port.

Each case runs the CLI in-process with `run_server` replaced by a stub that fails the test: a
bad flag or file must be an `lmstack: error:` line and exit code 2, never a server that answers
503 forever. A model that fails to load in the background (after the port is bound) stops the
server, and the command exits with code 2 and the reason.
"""

import json
import shutil
import socket
import subprocess
import sys
import threading

import httpx
import pytest
import torch
from net_helpers import free_port

from lmstack.cli import main
from lmstack.errors import CheckpointError
from lmstack.serve import ServeConfig, create_app


@pytest.fixture()
def no_server(monkeypatch):
    """Replace run_server: reaching it means the options were accepted."""
    import lmstack.serve.server

    calls = []

    def fake_run_server(app, host="127.0.0.1", port=8000, shutdown_timeout=30.0, log_level="info"):
        calls.append(dict(host=host, port=port, log_level=log_level))

    monkeypatch.setattr(lmstack.serve.server, "run_server", fake_run_server)
    return calls


def _serve(capsys, no_server, *args) -> str:
    """Run `lmstack serve ARGS` in-process; the error line it printed (exit code 2, no server started)."""
    code = main(["serve", *args])
    err = capsys.readouterr().err
    assert not no_server, f"the server was started for {args}"
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("lmstack: error: "), err
    return err


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device 'tpu' is not a device lmstack runs on; use auto, cpu, cuda or cuda:N"),
    (["--dtype", "float99"], "--dtype 'float99' is not one of auto, float32"),
    (["--max_num_seqs", "0"], "--max_num_seqs 0 must be a positive integer"),
    (["--block_size", "0"], "--block_size 0 must be a positive integer"),
    (["--num_blocks", "0"], "--num_blocks 0 must be a positive integer"),
    (["--max_num_batched_tokens", "-5"], "--max_num_batched_tokens -5 must be a positive integer"),
    (["--gpu_memory_utilization", "5"], "--gpu_memory_utilization 5.0 must be in (0, 1]"),
    (["--cpu_kv_cache_gib", "-1"], "--cpu_kv_cache_gib -1.0 must be > 0"),
    (["--port", "99999"], "--port 99999 must be in 1..65535"),
    (["--port", "0"], "--port 0 must be in 1..65535"),
    (["--log_level", "garbage"], "--log_level 'garbage' is not one of critical, error, warning, info, debug"),
    (["--max_model_len", "100000"],
     "--max_model_len 100000 exceeds the model's context of 256 (max_position_embeddings); use at most 256"),
])
def test_bad_options_exit_2_before_binding(tiny_dir, capsys, no_server, args, message):
    err = _serve(capsys, no_server, str(tiny_dir), *args)
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tiny_dir, capsys, no_server):
    err = _serve(capsys, no_server, str(tiny_dir), "--device", "cuda")
    assert "--device cuda but CUDA is not available here; use --device cpu or auto" in err


@pytest.mark.cuda
def test_a_cuda_device_that_does_not_exist_is_a_clear_error(tiny_dir, capsys, no_server):
    err = _serve(capsys, no_server, str(tiny_dir), "--device", "cuda:99")
    assert f"--device cuda:99 but this machine has {torch.cuda.device_count()} CUDA device(s)" in err


def test_good_options_reach_the_server(tiny_dir, capsys, no_server):
    port = free_port()
    code = main(["serve", str(tiny_dir), "--port", str(port), "--device", "cpu", "--max_model_len", "256",
                 "--log_level", "WARNING", "--dtype", "float32", "--num_blocks", "8"])
    assert code == 0, capsys.readouterr().err
    assert no_server == [dict(host="127.0.0.1", port=port, log_level="warning")]


def test_a_port_in_use_or_a_foreign_host_is_refused_before_loading(tiny_dir, capsys, no_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _serve(capsys, no_server, str(tiny_dir), "--port", str(port))
    assert f"--port {port} is already in use on 127.0.0.1; stop what listens there or choose another --port" in err
    err = _serve(capsys, no_server, str(tiny_dir), "--host", "no-such-host.invalid", "--port", str(free_port()))
    assert "--host 'no-such-host.invalid' is not an address of this machine" in err


def test_broken_model_files_exit_2_before_binding(tiny_dir, tmp_path, capsys, no_server):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    err = _serve(capsys, no_server, str(truncated))
    assert f"{weights} is corrupt or truncated" in err and "re-download or re-save it" in err

    bad_config = tmp_path / "bad-config"
    shutil.copytree(tiny_dir, bad_config)
    config = json.loads((bad_config / "config.json").read_text())
    config.pop("rope_parameters", None)  # transformers v5 keeps rope_theta there; v4 at the top level
    config["rope_theta"] = "abc"
    (bad_config / "config.json").write_text(json.dumps(config))
    err = _serve(capsys, no_server, str(bad_config))
    assert f"{bad_config / 'config.json'}" in err and "'abc'" in err

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    err = _serve(capsys, no_server, str(no_weights))
    assert f"no weights in {no_weights}" in err




def test_a_load_failure_stops_the_server_and_raises():
    from lmstack.serve.server import make_server, raise_load_failure

    def loader():
        raise CheckpointError("weights.safetensors is corrupt; re-save it")

    app = create_app(config=ServeConfig(model_names=["tiny"]), loader=loader)
    server = make_server(app, "127.0.0.1", free_port(), shutdown_timeout=5.0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        server.should_exit = True
        thread.join(10)
        pytest.fail("the server kept running after the model failed to load")
    with pytest.raises(CheckpointError, match="weights.safetensors is corrupt; re-save it"):
        raise_load_failure(app.state.lmstack)


def test_a_load_failure_is_not_retry_shortly():
    """Without a server to stop (an app used directly), requests say why, with no Retry-After."""
    from fastapi.testclient import TestClient

    def loader():
        raise CheckpointError("weights.safetensors is corrupt; re-save it")

    app = create_app(config=ServeConfig(model_names=["tiny"]), loader=loader)
    with TestClient(app) as client:
        for _ in range(100):
            if app.state.lmstack.load_error is not None:
                break
            threading.Event().wait(0.05)
        r = client.post("/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 503 and "Retry-After" not in r.headers
        message = r.json()["error"]["message"]
        assert message == "the model failed to load: CheckpointError: weights.safetensors is corrupt; re-save it"
        assert "weights.safetensors is corrupt" in client.get("/health").json()["error"]["message"]


def test_cli_exits_2_when_the_model_fails_to_load_after_binding(tiny_dir, tmp_path):
    """config.json and the weights' headers are fine, but the shapes disagree: found while loading."""
    broken = tmp_path / "mismatched"
    shutil.copytree(tiny_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] = 300  # the weights have 320 rows
    (broken / "config.json").write_text(json.dumps(config))
    port = free_port()
    try:
        out = subprocess.run([sys.executable, "-m", "lmstack.cli", "serve", str(broken), "--port", str(port),
                              "--device", "cpu", "--num_blocks", "8", "--log_level", "warning"],
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        pytest.fail("the server kept running after the model failed to load")
    assert out.returncode == 2, out.stderr
    assert "lmstack: error: " in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "has shape (320, 64), but config.json implies (300, 64)" in out.stderr.splitlines()[-1], out.stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)

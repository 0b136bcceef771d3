"""`lmstack serve`: an OpenAI-compatible HTTP server over the batched engine.

Every option, the device, config.json and the weight files' headers are checked before the
port is bound, so a typo exits at once with code 2 and a message naming the flag or file. The
server then starts listening and loads the model in the background (/health says 503 until it
is ready), so supervisors and load balancers see it come up; if loading fails after all, the
server stops and the command exits with code 2 and the reason (a permanent failure is never
served as "503, retry shortly").
"""

from __future__ import annotations

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    num_blocks: int | None = None,
    gpu_memory_utilization: float = 0.9,
    cpu_kv_cache_gib: float = 1.0,
    block_size: int = 16,
    enable_prefix_caching: bool = True,
    kv_cache_dtype: str = "auto",
    max_waiting: int = 256,
    max_n: int = 16,
    max_prompts: int = 64,
    max_body_bytes: int = 8 * 1024 * 1024,
    body_timeout: float = 30.0,
    max_connections: int = 1024,
    max_stop_chars: int = 1000,
    request_timeout: float = 600.0,
    safety_config: str | None = None,
    shutdown_timeout: float = 30.0,
    chat_page: bool = True,
    trust_request_chat_template: bool = False,
    log_level: str = "info",
) -> None:
    """Serve a model over OpenAI's API: /v1/completions, /v1/chat/completions, /v1/embeddings and more.

    Args:
        model: A Hugging Face model directory (with tokenizer.json), e.g. runs/quickstart/model.
        host: Address to bind. The default, 127.0.0.1, is reachable only from this machine; use 0.0.0.0 with --api-key.
        port: TCP port, 1..65535.
        api_key: Required 'Authorization: Bearer' key (several: comma-separated). Default: $LMSTACK_API_KEY, else open.
        served_model_name: The name clients pass as `model` (several: comma-separated). Default: the MODEL argument.
        max_model_len: Context length (prompt + output), at most the model's. Default: the model's max_position_embeddings.
        dtype: Weight dtype: auto (checkpoint's; bfloat16 for float32 checkpoints on CUDA), float32, bfloat16, float16.
        device: auto, cpu, cuda or cuda:N. Default (auto): cuda when available.
        max_num_seqs: Sequences decoded together (the batch).
        max_num_batched_tokens: Tokens per engine step (prefill chunks plus decodes).
        num_blocks: KV-cache blocks; default sized from memory (--gpu-memory-utilization or --cpu-kv-cache-gib).
        gpu_memory_utilization: Fraction of GPU memory for weights, activations (one full step, profiled) and KV cache.
        cpu_kv_cache_gib: KV-cache size on CPU, in GiB.
        block_size: Tokens per KV-cache block.
        enable_prefix_caching: Reuse the KV of shared prompt prefixes.
        kv_cache_dtype: auto (the model's dtype) or fp8 (float8_e4m3fn: twice the cached tokens, half the attention reads; slightly less exact).
        max_waiting: Requests that may wait for their first token; beyond it clients get 429 with Retry-After.
        max_n: Largest `n` (samples per prompt) a request may ask for.
        max_prompts: Most prompts (or embedding inputs) in one request.
        max_body_bytes: Largest request body; larger ones get 413.
        body_timeout: Seconds a request's body may take to arrive in full; a slower one gets 408.
        max_connections: Most open connections (and running requests) at once; beyond it new ones get 503 at once.
        max_stop_chars: Most characters in one stop string; longer ones get 400.
        request_timeout: Seconds a request may take from arrival to its last token (504 after).
        safety_config: YAML/JSON file of blocked patterns by category (see docs/serving.md); off by default.
        shutdown_timeout: Seconds in-flight requests get to finish after SIGTERM before they are aborted.
        chat_page: Serve the chat page at /.
        trust_request_chat_template: Render a request's own `chat_template` (Jinja, sandboxed); off: such requests get 400.
        log_level: uvicorn's log level: critical, error, warning, info, debug.
    """
    import logging

    from lmstack.serve.safety import SafetyFilter

    # cheap checks first: no torch or FastAPI import for a typo
    log_level = _check_server_options(port, log_level, shutdown_timeout)
    _check_model_dir(model)
    from lmstack.engine.core import KV_CACHE_DTYPES
    from lmstack.errors import ConfigError

    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"--kv_cache_dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    safety = SafetyFilter.load(safety_config) if safety_config else None
    engine_options = dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, num_blocks=num_blocks,
                          gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gib=cpu_kv_cache_gib,
                          block_size=block_size, enable_prefix_caching=enable_prefix_caching,
                          kv_cache_dtype=kv_cache_dtype)
    _check_engine_options(engine_options)
    _check_dtype(dtype)
    from lmstack.train.distributed import resolve_device

    torch_device = resolve_device(device)
    _check_model_files(model, max_model_len)  # config.json and the weights' headers, before the port is bound
    _check_port_free(host, port)  # before loading: uvicorn would report it only after the model loaded

    from lmstack.serve.admission import ServeLimits
    from lmstack.serve.app import ServeConfig, create_app
    from lmstack.serve.auth import resolve_api_keys
    from lmstack.serve.server import run_server

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    names = [n.strip() for n in (served_model_name or model).split(",") if n.strip()]
    keys = resolve_api_keys(api_key.split(",") if api_key else None)
    config = ServeConfig(
        model_names=names, model_root=model, api_keys=keys,
        limits=ServeLimits(max_waiting=max_waiting, max_n=max_n, max_prompts=max_prompts,
                           max_body_bytes=max_body_bytes, body_timeout=body_timeout,
                           max_connections=max_connections, max_stop_chars=max_stop_chars,
                           request_timeout=request_timeout),
        safety=safety, chat_page=chat_page, trust_request_chat_template=trust_request_chat_template)

    def load():
        from lmstack.engine import AsyncEngine

        return AsyncEngine(model, dtype=None if dtype == "auto" else dtype, device=torch_device, **engine_options)

    app = create_app(config=config, loader=load)
    # raises the loader's error (exit code 2 for an LmstackError) if the model fails to load
    run_server(app, host=host, port=port, shutdown_timeout=shutdown_timeout, log_level=log_level)


def _check_server_options(port: int, log_level: str, shutdown_timeout: float) -> str:
    """Check the server's own flags; returns the log level in lower case."""
    import math

    from lmstack.config import is_int
    from lmstack.errors import ConfigError

    if not is_int(port) or not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} must be in 1..65535")
    level = log_level.lower() if isinstance(log_level, str) else log_level
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log_level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if not (math.isfinite(shutdown_timeout) and shutdown_timeout >= 0):
        raise ConfigError(f"--shutdown_timeout {shutdown_timeout} must be a number of seconds >= 0")
    return level


def _check_port_free(host: str, port: int) -> None:
    """Bind (host, port) once, as uvicorn will (SO_REUSEADDR), so a port in use or a host that is
    not this machine's is one clear error instead of uvicorn's log line and exit code 3."""
    import errno
    import socket

    from lmstack.errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host {host!r} is not an address of this machine ({err.strerror}); use 127.0.0.1 or "
                          "0.0.0.0") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port} is already in use on {host}; stop what listens there or choose "
                                  "another --port") from None
            raise ConfigError(f"cannot listen on --host {host} --port {port}: {err.strerror}") from None


def _check_engine_options(options: dict) -> None:
    """EngineConfig's own checks, with the messages naming the flags."""

    from lmstack.engine.core import EngineConfig
    from lmstack.errors import ConfigError

    try:
        EngineConfig.from_kwargs(**options)
    except ConfigError as err:
        message = str(err)
        for name in options:
            if message.startswith(f"{name}="):  # "max_num_seqs=0 must be ..." -> "--max_num_seqs 0 must be ..."
                raise ConfigError(f"--{name} {message[len(name) + 1:]}") from None
        raise


def _check_dtype(dtype: str) -> None:
    from lmstack.checkpoint.hf import DTYPES
    from lmstack.errors import ConfigError

    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")


def _check_model_files(model: str, max_model_len: int | None) -> None:
    """Read config.json and open the weight files' headers (no tensor data), and check --max_model_len
    against the model's context, so a broken directory fails before the port is bound."""
    from pathlib import Path

    from lmstack.checkpoint.hf_config import read_config
    from lmstack.errors import ConfigError
    from lmstack.infer.quantize import is_quantized_dir

    path = Path(model)
    config = read_config(path)  # CheckpointError naming config.json and the field
    if not is_quantized_dir(path):  # `lmstack quantize` output has its own weight format
        from lmstack.checkpoint.files import WeightFiles

        WeightFiles(path)  # CheckpointError for missing, truncated or corrupt safetensors
    context = config.max_position_embeddings
    if max_model_len is not None and max_model_len > context:
        raise ConfigError(f"--max_model_len {max_model_len} exceeds the model's context of {context} "
                          f"(max_position_embeddings); use at most {context}")


def _check_model_dir(model: str) -> None:
    """Fail before binding the port when the directory cannot be a model (a typo, a missing tokenizer)."""
    from pathlib import Path

    from lmstack.errors import CheckpointError

    path = Path(model)
    if not path.is_dir():
        raise CheckpointError(f"{model} is not a directory; pass a Hugging Face model directory "
                              "(config.json, model.safetensors, tokenizer.json)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{model} has no config.json; it is not a Hugging Face model directory")
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{model} has no tokenizer.json; the server needs the tokenizer to read text prompts")

"""Run the app under uvicorn with lmstack's shutdown rules.

On SIGTERM or Ctrl-C the server stops accepting connections and marks itself draining
(/health and new requests answer 503), lets in-flight requests finish for up to
`shutdown_timeout` seconds, then cancels the rest (which aborts them in the engine), stops
the engine and exits with status 0. A second signal exits at once. Unlike plain uvicorn, the
signal is not re-raised afterwards, so a supervisor sees a clean exit.

If the app's loader fails (the model cannot be loaded), the server stops the same way and
`run_server` raises the loader's error: an `LmstackError` as it is (the CLI exits with code 2
and its message), anything else wrapped in one, its traceback already logged.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Generator
from typing import Any

import uvicorn

log = logging.getLogger("lmstack.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LmstackServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: Any):
        super().__init__(config)
        self.lmstack_state = state
        state.on_load_failure.append(self._load_failed)

    def _load_failed(self, err: BaseException) -> None:
        self.lmstack_state.admission.draining = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True
        self.lmstack_state.admission.draining = True

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def make_server(app: Any, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
                log_level: str = "info") -> LmstackServer:
    state = app.state.lmstack
    if host not in LOOPBACK and not state.config.api_keys:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model; "
                    "pass --api-key or set LMSTACK_API_KEY", host)
    limits = state.config.limits
    # limit_concurrency: beyond `max_connections` open connections (or running requests) uvicorn answers
    # 503 at once instead of holding and buffering more; h11_max_incomplete_event_size bounds the request
    # line and headers (h11's own default, 16 KiB, made explicit); timeout_keep_alive closes idle
    # keep-alive connections after 5 s. Bodies have their own deadline (`--body-timeout`, BodySizeLimit).
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout,
                            log_level=log_level, lifespan="on", access_log=log_level == "debug",
                            timeout_keep_alive=5, limit_concurrency=limits.max_connections,
                            h11_max_incomplete_event_size=16 * 1024)
    return LmstackServer(config, state)


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
               log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT; returns after a graceful shutdown. Raises if the model fails to load."""
    make_server(app, host, port, shutdown_timeout, log_level).run()
    raise_load_failure(app.state.lmstack)


def raise_load_failure(state: Any) -> None:
    """Raise what the app's loader raised, if it failed, as an `LmstackError`."""
    from lmstack.errors import LmstackError

    err = state.load_exception
    if err is None:
        return
    if isinstance(err, LmstackError):
        raise err
    raise LmstackError(f"the model failed to load: {type(err).__name__}: {err} (the traceback is logged above)") from err

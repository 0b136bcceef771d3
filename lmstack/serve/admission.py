"""Admission control: what the server accepts before any work, and how much may wait.

A server under load must say no quickly rather than queue without bound: requests that have
been admitted but have not produced their first token count as *waiting*; beyond
`max_waiting` new ones get 429 with `Retry-After`. Bodies above `max_body_bytes` get 413 before
they are parsed, and a body that has not fully arrived within `body_timeout` seconds gets 408.
Each request has a deadline (`request_timeout`), and while the server drains
for shutdown new requests get 503. Everything here is per-app state, no globals.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from lmstack.serve.errors import APIError


@dataclass
class ServeLimits:
    """Per-request bounds and queue limits (the CLI flags of `lmstack serve`)."""

    max_waiting: int = 256  # engine requests admitted but not yet producing tokens
    max_n: int = 16  # samples per prompt
    max_prompts: int = 64  # prompts in one completions/embeddings request
    max_stop: int = 32  # stop strings per request (OpenAI allows 4; eval harnesses send more)
    max_stop_chars: int = 1000  # characters in one stop string
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout: float = 30.0  # seconds for a request's body to arrive in full (408 after)
    max_connections: int = 1024  # open connections + requests; beyond it uvicorn answers 503 (limit_concurrency)
    request_timeout: float = 600.0  # seconds from arrival to the last token
    retry_after: int = 1  # seconds suggested to a client refused for a full queue

    def __post_init__(self) -> None:
        from lmstack.errors import ConfigError

        for name in ("max_waiting", "max_n", "max_prompts", "max_stop", "max_stop_chars", "max_body_bytes",
                     "max_connections", "retry_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value!r} must be an integer >= 1")
        if not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout={self.request_timeout!r} must be > 0 seconds")
        if not (isinstance(self.body_timeout, (int, float)) and math.isfinite(self.body_timeout)
                and self.body_timeout > 0):
            raise ConfigError(f"--body-timeout={self.body_timeout!r} must be a finite number of seconds > 0")


class Ticket:
    """One admitted HTTP request holding `count` engine requests; `started()` as each produces output."""

    def __init__(self, controller: AdmissionController, count: int):
        self._controller = controller
        self._waiting = count
        self._closed = False

    def started(self, count: int = 1) -> None:
        count = min(count, self._waiting)
        self._waiting -= count
        self._controller.num_waiting -= count

    def close(self) -> None:
        """Release whatever is left (idempotent): called when the HTTP request ends, however it ends."""
        if not self._closed:
            self._closed = True
            self.started(self._waiting)
            self._controller.num_in_flight -= 1

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AdmissionController:
    """Counts waiting and in-flight requests; refuses with 429 (queue full) or 503 (draining)."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.num_waiting = 0
        self.num_in_flight = 0  # HTTP requests being served (streaming or not)
        self.draining = False

    def acquire(self, num_requests: int = 1) -> Ticket:
        """Admit `num_requests` engine requests (one HTTP request may hold several prompts) or raise."""
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", code="shutting_down")
        limit = self.limits.max_waiting
        # A single request larger than the whole queue is still let in when nothing else waits.
        if self.num_waiting + num_requests > limit and not (self.num_waiting == 0 and num_requests > limit):
            raise APIError(429, f"the server's queue is full ({self.num_waiting} requests waiting, limit "
                           f"{limit}); retry after {self.limits.retry_after} s", code="queue_full",
                           headers={"Retry-After": str(max(1, math.ceil(self.limits.retry_after)))})
        self.num_waiting += num_requests
        self.num_in_flight += 1
        return Ticket(self, num_requests)


class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by Content-Length or as it streams in; 408 for a
    body that has not arrived in full within `timeout` seconds (a slow or stalled client).

    The body is read here in full (it is bounded) and replayed to the app, so the limit holds
    whatever the app does with the body; later `receive` calls (disconnects) pass through.
    """

    def __init__(self, app: Any, max_bytes: int, timeout: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, 413, f"the request body is larger than the server's limit of "
                                      f"{self.max_bytes} bytes (--max-body-bytes)", "request_too_large")
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(self.timeout):
                outcome = await self._read(receive, chunks)
        except TimeoutError:
            return await self._refuse(send, 408, f"the request body did not arrive within {self.timeout:g} seconds "
                                      "(--body-timeout)", "request_timeout",
                                      headers={"Connection": "close"})
        if outcome == "gone":  # the client left before sending its body
            return
        if outcome == "too_large":
            return await self._refuse(send, 413, f"the request body is larger than the server's limit of "
                                      f"{self.max_bytes} bytes (--max-body-bytes)", "request_too_large")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Any, chunks: list[bytes]) -> str:
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return "gone"
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return "too_large"
            if not message.get("more_body", False):
                return "ok"

    async def _refuse(self, send: Any, status: int, message: str, code: str,
                      headers: dict[str, str] | None = None) -> None:
        response = APIError(status, message, code=code, headers=headers).response()
        await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

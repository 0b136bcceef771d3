"""Admission control: what the server accepts before any work, and how much may wait.

A server under load must say no quickly rather than queue without bound: requests that have
been admitted but have not produced their first token count as *waiting*; beyond
`max_waiting` new ones get 429 with `Retry-After`. Bodies above `max_body_bytes` get 413 before
they are parsed. Each request has a deadline (`request_timeout`), and while the server drains
for shutdown new requests get 503. Everything here is per-app state, no globals.
"""

from __future__ import annotations

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
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout: float = 600.0  # seconds from arrival to the last token
    retry_after: int = 1  # seconds suggested to a client refused for a full queue

    def __post_init__(self) -> None:
        from lmstack.errors import ConfigError

        for name in ("max_waiting", "max_n", "max_prompts", "max_stop", "max_body_bytes", "retry_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value!r} must be an integer >= 1")
        if not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout={self.request_timeout!r} must be > 0 seconds")


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
    """ASGI middleware: 413 for a body over `max_bytes`, by Content-Length or as it streams in.

    The body is read here in full (it is bounded) and replayed to the app, so the limit holds
    whatever the app does with the body; later `receive` calls (disconnects) pass through.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        err = APIError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes "
                       "(--max-body-bytes)", code="request_too_large")
        response = err.response()
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

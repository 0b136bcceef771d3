"""API keys: `Authorization: Bearer <key>`, checked in constant time.

Keys come from `--api-key` (repeatable) or the `LMSTACK_API_KEY` environment variable
(comma-separated). Every key is compared with `hmac.compare_digest` and the loop never stops
early, so the response time says nothing about how much of a key was right. No keys: open.

`APIKeyGate` checks the header in the ASGI layer, before any body is read or parsed, for the
routes that need a key (every /v1/*, /tokenize, /detokenize): a client without the key costs
the server no body read and no JSON parsing. /, /health, /metrics, /docs and /openapi.json
stay open. The routes' FastAPI dependency (the same check) stays too, and documents the
scheme in the OpenAPI document.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from typing import Any

from fastapi import Request

from lmstack.errors import ConfigError
from lmstack.serve.errors import APIError

ENV_VAR = "LMSTACK_API_KEY"


def resolve_api_keys(cli_keys: Iterable[str] | str | None, environ: dict[str, str] | None = None) -> list[str]:
    """The keys the server accepts: the flag's if given, else the environment's."""
    if isinstance(cli_keys, str):
        cli_keys = [cli_keys]
    keys = [k.strip() for k in (cli_keys or []) if k is not None]
    if not keys:
        env = os.environ if environ is None else environ
        keys = [k.strip() for k in env.get(ENV_VAR, "").split(",") if k.strip()]
    for key in keys:
        if not key:
            raise ConfigError("--api-key is empty; pass a non-empty key or leave the flag out for an open server")
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ConfigError("--api-key must be printable and without spaces (clients send it in an HTTP header)")
    return keys


class APIKeyAuth:
    """A FastAPI dependency: raises 401 unless the request carries one of `keys`."""

    def __init__(self, keys: Iterable[str]):
        self._keys = [k.encode("utf-8") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def is_valid(self, presented: str) -> bool:
        candidate = presented.encode("utf-8", errors="replace")
        ok = False
        for key in self._keys:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(candidate, key)
        return ok

    async def __call__(self, request: Request) -> None:
        self.check(request.headers.get("authorization", ""))

    def check(self, header: str) -> None:
        """Raise 401 unless `header` (the Authorization header's value) is 'Bearer <one of the keys>'."""
        if not self._keys:
            return
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not self.is_valid(token.strip()):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


PROTECTED_PATHS = ("/tokenize", "/detokenize")


def needs_key(path: str) -> bool:
    """Whether a request path is behind the API key: /v1 and everything under it, /tokenize, /detokenize."""
    return path == "/v1" or path.startswith("/v1/") or path in PROTECTED_PATHS


class APIKeyGate:
    """ASGI middleware: 401 for a request to a keyed route without a valid key, before its body is read."""

    def __init__(self, app: Any, auth: APIKeyAuth):
        self.app = app
        self.auth = auth

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.auth.enabled and needs_key(scope.get("path", "")):
            header = b""
            for name, value in scope.get("headers") or []:
                if name.lower() == b"authorization":
                    header = value
                    break
            try:
                self.auth.check(header.decode("latin-1"))
            except APIError as err:
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)

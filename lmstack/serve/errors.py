"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Handlers raise `APIError`; `install_error_handlers` turns it, FastAPI's validation errors
(malformed JSON, wrong types: 400, never 422), unknown routes and anything unexpected into
that body, so every client (the official `openai` library included) reads the same shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lmstack.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
          504: "timeout_error"}


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI's fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The client left before its answer was ready; the work was cancelled (and aborted in the engine)."""


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


_UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "input": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {'type': 'text', 'text': ...} parts",
}


def _location(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages.0.content' (pydantic's union tags dropped)."""
    parts = []
    for p in loc:
        if p in ("body", "query", "path"):
            continue
        if isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "list", "dict", "none")):
            break  # a union member's name: the field itself is what the client got wrong
        parts.append(str(p))
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's list of pydantic errors -> one readable 400 naming the first bad field."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}); "
                           "send a JSON object with Content-Type: application/json", code="invalid_json")
    param = _location(tuple(first.get("loc", ())))
    if param is None:
        return bad_request("the request body must be a JSON object (Content-Type: application/json)",
                           code="invalid_type")
    if kind == "missing":
        return bad_request(f"missing required field {param!r}", param=param, code="missing_required_parameter")
    same_field = [e for e in errors if _location(tuple(e.get("loc", ()))) == param]
    leaf = param.rsplit(".", 1)[-1]
    if len(same_field) > 1 and leaf in _UNION_HINTS:
        return bad_request(f"field {param!r} must be {_UNION_HINTS[leaf]}", param=param, code="invalid_type")
    msg = first.get("msg", "invalid value")
    more = len(errors) - len(same_field)
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    return bad_request(f"field {param!r}: {msg}{tail}", param=param,
                       code="invalid_type" if "type" in kind or "parsing" in kind else "invalid_value")


def _counted(request: Request, err: APIError) -> JSONResponse:
    state = getattr(request.app.state, "lmstack", None)
    if state is not None:
        state.metrics.error(err.status)
    return err.response()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _counted(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _counted(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}; see /docs for the API",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _counted(request, APIError(exc.status_code, message, code=None, headers=getattr(exc, "headers", None)))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _counted(request, APIError(500, f"internal server error ({type(exc).__name__}); the server log has "
                                          "the traceback", type="server_error", code="internal_error"))

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

from lmstack.tokenizer.tokenizer import lone_surrogate

log = logging.getLogger("lmstack.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
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


def short(value: object, limit: int = 40) -> str:
    """repr(value), cut to about `limit` characters: a client's 5000-digit key is not echoed in full."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"<an integer of about {value.bit_length() * 3 // 10} digits>" if isinstance(value, int) else "<?>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def check_text(text: str, param: str, where: str | None = None) -> None:
    """400 naming `param` (the message says `where`, e.g. messages[0].content) when `text` holds a lone surrogate."""
    index = lone_surrogate(text)
    if index is not None:
        raise bad_request(f"{where or param} is not valid Unicode text (a lone surrogate \\u{ord(text[index]):04x} at index "
                          f"{index})", param=param)


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


_TOKEN_ID_FIELDS = ("prompt", "input", "tokens", "stop_token_ids")


def _negative_token_id(errors: list[dict], vocab_size: int | None) -> APIError | None:
    """A negative token id anywhere in a token-id field: say so, not "must be a string or ..."."""
    for e in errors:
        loc = tuple(e.get("loc", ()))
        value = e.get("input")
        if e.get("type") == "greater_than_equal" and len(loc) > 1 and loc[1] in _TOKEN_ID_FIELDS \
                and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            vocab = f"[0, {vocab_size})" if vocab_size else "(token ids are >= 0)"
            return bad_request(f"{loc[1]}: token id {short(value)} is outside the vocabulary {vocab}", param=loc[1])
    return None


def _model_validator_error(first: dict) -> APIError:
    """A cross-field check of a request model (`model_validator`) failed: its own message, as written."""
    error = first.get("ctx", {}).get("error")
    message = str(error) if error is not None else str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    param = getattr(error, "param", None)
    return bad_request(message, param=param)


def validation_error(exc: RequestValidationError, vocab_size: int | None = None) -> APIError:
    """FastAPI's list of pydantic errors -> one readable 400 naming the first bad field."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}); "
                           "send a JSON object with Content-Type: application/json", code="invalid_json")
    negative = _negative_token_id(errors, vocab_size)
    if negative is not None:
        return negative
    param = _location(tuple(first.get("loc", ())))
    if param is None and kind in ("value_error", "assertion_error"):
        return _model_validator_error(first)
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


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's HTTPException for any non-JSONDecodeError


def body_parse_error(cause: BaseException | None) -> APIError:
    """The body could not be read as JSON for a reason other than a syntax error: say which."""
    if isinstance(cause, UnicodeDecodeError):
        reason = f"it is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    elif isinstance(cause, RecursionError):
        reason = "it is nested too deeply"
    elif isinstance(cause, ValueError) and "digits" in str(cause):
        reason = "it holds an integer with too many digits"
    elif cause is not None:
        reason = f"{type(cause).__name__}: {short(str(cause), 80)}"
    else:
        reason = "parse error"
    return bad_request(f"the request body is not valid JSON ({reason}); send a JSON object with "
                       "Content-Type: application/json", code="invalid_json")


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
        state = getattr(request.app.state, "lmstack", None)
        engine = getattr(state, "engine", None)
        return _counted(request, validation_error(exc, getattr(engine, "vocab_size", None)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _FASTAPI_PARSE_ERROR:
            return _counted(request, body_parse_error(exc.__cause__))
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

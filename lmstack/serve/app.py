"""The FastAPI app: OpenAI-compatible routes over an `AsyncEngine`, plus health, metrics, a chat page.

`create_app(engine, tokenizer, config)` builds one self-contained app (its own metrics
registry, admission counters and safety filter; nothing global). The engine may come later
(`app.state.lmstack.set_engine(...)`, or a `loader` run at startup): until then every model
route and /health answer 503, so a load balancer can wait for a large model to load. If the
loader fails, the failure is permanent: `make_server`'s server stops and `run_server` raises
the loader's error (until then requests get 503 naming it, without Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lmstack.errors import ConfigError, LmstackError
from lmstack.serve.admission import AdmissionController, BodySizeLimit, ServeLimits, Ticket
from lmstack.serve.auth import APIKeyAuth, APIKeyGate
from lmstack.serve.chat import create_chat_completion, render_chat_async
from lmstack.serve.completions import create_completion
from lmstack.serve.engine_client import EngineClient
from lmstack.serve.errors import APIError, bad_request, install_error_handlers, log, short
from lmstack.serve.generation import until_disconnected
from lmstack.serve.logprobs import TokenTexts
from lmstack.serve.metrics import CONTENT_TYPE, ServerMetrics
from lmstack.serve.params import as_batch, check_model, encode
from lmstack.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
    now,
)
from lmstack.serve.safety import SafetyFilter

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    """What `lmstack serve` was asked for (besides the engine's own options)."""

    model_names: list[str] = field(default_factory=lambda: ["lmstack"])  # the first is the default
    model_root: str | None = None  # the model directory, shown in /v1/models
    api_keys: list[str] = field(default_factory=list)
    limits: ServeLimits = field(default_factory=ServeLimits)
    safety: SafetyFilter | None = None
    chat_page: bool = True
    trust_request_chat_template: bool = False  # run a request's own `chat_template` (vLLM's flag)

    def __post_init__(self) -> None:
        if not self.model_names or not all(isinstance(n, str) and n for n in self.model_names):
            raise ConfigError(f"--served-model-name {self.model_names!r} must be one or more non-empty names")


class ServeState:
    """Everything one app needs at request time (kept on `app.state.lmstack`)."""

    def __init__(self, config: ServeConfig, engine: Any = None, tokenizer: Any = None):
        self.config = config
        self.admission = AdmissionController(config.limits)
        self.metrics = ServerMetrics(config.model_names[0], self._stats, self.admission)
        self.engine: EngineClient | None = None
        self.tokenizer = tokenizer
        self.texts: TokenTexts | None = None
        self.load_exception: BaseException | None = None  # what the loader raised
        self.on_load_failure: list[Callable[[BaseException], None]] = []  # e.g. the server stopping itself
        self.created = now()
        if engine is not None:
            self.set_engine(engine, tokenizer)
        else:
            self.metrics.starting.labels(config.model_names[0]).set(1)

    def set_engine(self, engine: Any, tokenizer: Any = None) -> None:
        client = engine if isinstance(engine, EngineClient) else EngineClient(engine)
        tokenizer = tokenizer if tokenizer is not None else (self.tokenizer or client.tokenizer)
        if tokenizer is None:
            raise ConfigError("the server needs a tokenizer: the model directory has no tokenizer.json; add one "
                              "or pass tokenizer=...")
        self.tokenizer, self.texts, self.engine = tokenizer, TokenTexts(tokenizer), client
        self.metrics.starting.labels(self.config.model_names[0]).set(0)

    @property
    def load_error(self) -> str | None:
        """Why the model failed to load (permanent: /health reports it until the server stops)."""
        err = self.load_exception
        return None if err is None else f"{type(err).__name__}: {err}"

    def _stats(self) -> Any:
        return self.engine.stats() if self.engine is not None else None

    def health_problem(self) -> str | None:
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self.engine is None:
            return "the model is still loading"
        if self.admission.draining:
            return "the server is shutting down"
        if not self.engine.is_healthy:
            return f"the engine is not healthy ({self.engine.error!r})"
        return None

    def require_engine(self) -> None:
        problem = self.health_problem()
        if problem is not None and self.load_error is not None:  # permanent: no "retry", no Retry-After
            raise APIError(503, problem, code="engine_unavailable")
        if problem is not None:
            raise APIError(503, problem + "; retry shortly", code="engine_unavailable", headers={"Retry-After": "5"})

    def admit(self, num_requests: int) -> Ticket:
        try:
            return self.admission.acquire(num_requests)
        except APIError as err:
            self.metrics.refusal(err.code or str(err.status))
            raise


def _auth_dependency(auth: APIKeyAuth) -> Callable:
    bearer = HTTPBearer(auto_error=False, description="An API key given to `lmstack serve --api-key`.")

    async def check(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        await auth(request)

    return check


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 408, 413, 429, 503)}


def create_app(engine: Any = None, tokenizer: Any = None, config: ServeConfig | None = None,
               loader: Callable[[], Any] | None = None, shutdown_engine: bool | None = None) -> FastAPI:
    """The server app.

    engine: an `AsyncEngine` (or None with `loader`, a blocking function returning one, run at
    startup off the event loop). tokenizer: defaults to the engine's. shutdown_engine: stop the
    engine when the app stops; by default only an engine the app loaded itself.
    """
    from contextlib import asynccontextmanager

    config = config or ServeConfig()
    state = ServeState(config, engine, tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        load_task = None
        if loader is not None and state.engine is None:
            async def load() -> None:
                try:
                    state.set_engine(await asyncio.to_thread(loader))
                except Exception as err:  # permanent: reported by /health until the server stops
                    log.error("loading the model failed", exc_info=not isinstance(err, LmstackError))
                    state.load_exception = err
                    for callback in state.on_load_failure:
                        callback(err)
            load_task = asyncio.ensure_future(load())
        try:
            yield
        finally:
            state.admission.draining = True
            if load_task is not None and not load_task.done():
                await asyncio.gather(load_task, return_exceptions=True)
            owns = loader is not None if shutdown_engine is None else shutdown_engine
            if state.engine is not None and owns:
                await state.engine.shutdown()

    app = FastAPI(title="lmstack", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over the lmstack engine.")
    app.state.lmstack = state
    install_error_handlers(app)
    auth = APIKeyAuth(config.api_keys)
    app.add_middleware(BodySizeLimit, max_bytes=config.limits.max_body_bytes, timeout=config.limits.body_timeout)
    app.add_middleware(APIKeyGate, auth=auth)  # added last: runs first, before the body is read

    api = APIRouter(dependencies=[Depends(_auth_dependency(auth))], responses=_ERRORS)

    @api.post("/v1/completions", response_model=CompletionResponse, summary="Create a completion")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, summary="Create a chat completion")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    def card(name: str) -> ModelCard:
        max_len = state.engine.max_model_len if state.engine is not None else None
        return ModelCard(id=name, created=state.created, root=config.model_root, max_model_len=max_len)

    @api.get("/v1/models", response_model=ModelList, summary="List the served model")
    async def models() -> ModelList:
        return ModelList(data=[card(name) for name in config.model_names])

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, summary="Describe one served model",
             responses={404: {"model": ErrorResponse}})
    async def model(model_id: str) -> ModelCard:
        if model_id not in config.model_names:
            raise APIError(404, f"the model {short(model_id)} does not exist on this server; it serves "
                           f"{config.model_names}", param="model", code="model_not_found")
        return card(model_id)

    @api.post("/v1/embeddings", response_model=EmbeddingResponse, summary="Embed text (mean-pooled hidden states)")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await _embeddings(state, body, request)

    @api.post("/tokenize", response_model=TokenizeResponse, summary="Text or chat messages to token ids")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(state, body.model)
        state.require_engine()
        if body.messages is not None:
            text = await render_chat_async(state, body.messages, add_generation_prompt=body.add_generation_prompt,
                                           chat_template=body.chat_template)
            ids = await encode(state, text, "messages", add_special_tokens=False)
        else:
            ids = await encode(state, body.prompt, "prompt", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.engine.max_model_len)

    @api.post("/detokenize", response_model=DetokenizeResponse, summary="Token ids to text")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(state, body.model)
        state.require_engine()
        bad = [t for t in body.tokens if t >= state.engine.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {state.engine.vocab_size})",
                              param="tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))

    app.include_router(api)

    @app.get("/health", summary="200 when the engine is ready, 503 while loading, unhealthy or draining",
             responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        problem = state.health_problem()
        if problem is not None:
            return APIError(503, problem, code="engine_unavailable").response()
        return JSONResponse({"status": "ok"})

    # HEAD /health: load balancers' probes (the same status, no body); kept out of the OpenAPI document,
    # where it would repeat GET's operation id
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    if config.chat_page:
        @app.get("/", summary="The chat page", response_class=FileResponse, include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


async def _embeddings(state: ServeState, body: EmbeddingRequest, request: Request) -> Response:
    model = check_model(state, body.model)
    state.require_engine()
    engine = state.engine
    inputs = as_batch(state, body.input, "input", "text")
    if body.dimensions is not None and body.dimensions != engine.hidden_size:
        raise bad_request(f"dimensions={body.dimensions} is not supported: this model's embeddings have "
                          f"{engine.hidden_size} dimensions", param="dimensions", code="unsupported_parameter")
    batch = []
    for item in inputs:
        if isinstance(item, str):
            ids = await encode(state, item, "input", add_special_tokens=True, max_tokens=engine.max_model_len)
        else:
            ids = list(item)
        if not ids:
            raise bad_request("an input is empty after tokenization", param="input")
        if len(ids) > engine.max_model_len:
            raise bad_request(f"an input has {len(ids)} tokens, more than max_model_len={engine.max_model_len}",
                              param="input", code="context_length_exceeded")
        if max(ids) >= engine.vocab_size:
            raise bad_request(f"token id {max(ids)} is outside the vocabulary [0, {engine.vocab_size})", param="input")
        batch.append(ids)
    with state.admit(len(batch)) as ticket:
        vectors = await until_disconnected(request, engine.embed(batch))
        ticket.started(len(batch))
    data = []
    for i, vector in enumerate(vectors):
        value: list[float] | str = vector
        if body.encoding_format == "base64":  # OpenAI's: little-endian float32, base64
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append(EmbeddingData(index=i, embedding=value))
    tokens = sum(len(ids) for ids in batch)
    return JSONResponse(EmbeddingResponse(data=data, model=model, usage=UsageInfo(
        prompt_tokens=tokens, total_tokens=tokens)).model_dump())

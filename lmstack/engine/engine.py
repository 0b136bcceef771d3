"""`LLM` for offline batches and `AsyncEngine` for serving, both over one `EngineCore`.

`LLM(path).generate(prompts, SamplingParams(...))` queues every prompt at once and steps
the engine until all are done (continuous batching does the rest), returning outputs in
input order. `AsyncEngine` runs the same core on a background thread (a forward pass blocks,
so it cannot share the event loop): requests arrive at any time from asyncio code, stream
their tokens back through per-request queues, and can be aborted, which frees their KV
blocks before `abort` returns.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import torch

from lmstack.config import is_int
from lmstack.engine.core import EngineConfig, EngineCore
from lmstack.engine.outputs import EngineStats, RequestOutput
from lmstack.errors import ConfigError, RequestError
from lmstack.infer.generate import as_token_lists
from lmstack.infer.params import SamplingParams


def build_core(model, tokenizer=None, dtype=None, device=None, **engine_options) -> EngineCore:
    """An EngineCore from a model directory (or a built `Transformer`) and engine options."""
    config = EngineConfig.from_kwargs(**engine_options)
    if isinstance(model, (str, Path)):
        from lmstack.loading import load

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, loaded_tokenizer = load(model, dtype=dtype, device=device)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if dtype is None and device.type == "cuda" and model.dtype == torch.float32:
            model = model.to(torch.bfloat16)  # as vLLM's dtype="auto": float32 checkpoints serve in 16 bits
    else:
        if device is not None:
            model = model.to(device)
        if dtype is not None:
            from lmstack.checkpoint.hf import resolve_dtype

            model = model.to(resolve_dtype(dtype))
    return EngineCore(model, tokenizer, config)


class LLM:
    """Offline batched generation (vLLM's `LLM`): paged KV cache, continuous batching, prefix caching.

    model: a Hugging Face directory or a `Transformer`; tokenizer: needed for text prompts
    (loaded from the directory when there is one). dtype/device: how to load it (default: the
    checkpoint's dtype, bfloat16 instead of float32 on CUDA; CUDA when available). Every other
    keyword is an `EngineConfig` option (block_size, num_blocks, gpu_memory_utilization,
    max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching, ...).
    """

    def __init__(self, model, tokenizer=None, *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, **engine_options):
        self.engine = build_core(model, tokenizer, dtype, device, **engine_options)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool | None = None, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for a prompt or a list of prompts (strings or token-id lists); outputs in input order.

        sampling_params: one for all prompts or one per prompt. Every request is validated before
        any work. use_tqdm: a progress bar (default: for 8 prompts or more).
        """
        ids, texts = as_token_lists(prompts, self.engine.tokenizer)
        if not ids:
            raise ConfigError("no prompts given")
        params = _per_prompt(sampling_params, len(ids), "sampling_params")
        priorities = _per_prompt(priority, len(ids), "priority") if priority is not None else [0] * len(ids)
        for i, (sp, prio) in enumerate(zip(params, priorities)):
            if sp is not None and not isinstance(sp, SamplingParams):
                raise ConfigError(f"sampling_params must be SamplingParams (one, or one per prompt), got "
                                  f"{type(sp).__name__}; e.g. SamplingParams(**your_dict)")
            if not is_int(prio):
                raise ConfigError(f"priority of prompt {i} is {prio!r}; priorities are integers (lower runs first)")
        requests = []
        for i, (p, text, sp, prio) in enumerate(zip(ids, texts, params, priorities)):
            try:
                request = self.engine.make_request(p, sp, priority=prio)
            except (ConfigError, RequestError) as err:  # name the prompt at fault when there are several
                raise (type(err)(f"prompt {i}: {err}") if len(ids) > 1 else err) from None
            request.prompt = text
            requests.append(request)
        for request in requests:
            self.engine.submit(request)
        return self._run([r.request_id for r in requests], use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool | None) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        show = len(request_ids) >= 8 if use_tqdm is None else use_tqdm
        done: dict[str, RequestOutput] = {}
        generated = 0
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not show, dynamic_ncols=True) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        generated += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        rate = generated / max(bar.format_dict["elapsed"], 1e-9)
                        bar.set_postfix_str(f"{rate:,.0f} out tok/s", refresh=False)
        return [done[rid] for rid in request_ids]

    def stats(self) -> EngineStats:
        return self.engine.stats()


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{name} has {len(value)} entries but there are {n} prompts; give one or one per prompt")
        return list(value)
    return [value] * n


class EngineDeadError(RuntimeError):
    """The engine's loop stopped on an internal error; the server should report itself unhealthy."""


class RequestStream:
    """The outputs of one request as an async iterator (each holds only the new tokens and text)."""

    def __init__(self, engine: AsyncEngine, request_id: str):
        self.engine, self.request_id = engine, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def put(self, item) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening any more
            self.engine._post(("abort", self.request_id, None))

    async def abort(self) -> None:
        if not self.finished:
            await self.engine.abort(self.request_id)


class AsyncEngine:
    """The engine on a background thread, for asyncio servers.

        engine = AsyncEngine("path/to/model", max_num_seqs=64)
        async for out in engine.generate("Hello", SamplingParams(max_tokens=32)):
            print(out.outputs[0].text, end="")        # only the new text of each step
        print(engine.stats())

    Arguments are those of `LLM`. Input errors raise from `add_request`/`generate` before any
    work; a request's stream ends with an output whose `finished` is True (finish_reason
    "stop", "length" or "abort").
    """

    def __init__(self, model, tokenizer=None, *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, **engine_options):
        self.core = build_core(model, tokenizer, dtype, device, **engine_options)
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._streams: dict[str, RequestStream] = {}
        self._stats = self.core.stats()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._exited = False  # the engine thread has returned: commands are answered at once
        self.error: BaseException | None = None

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def is_healthy(self) -> bool:
        return self.error is None and not self._stopping

    def stats(self) -> EngineStats:
        """The latest snapshot (refreshed after every step and every add/abort)."""
        return self._stats

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> RequestStream:
        """Validate and queue a request (call from a running event loop); returns its stream."""
        self._check_alive()
        request = self.core.make_request(prompt, params, request_id, priority, stream=True)
        stream = RequestStream(self, request.request_id)
        with self._cond:  # again under the lock: the engine may have died while the prompt was tokenized
            self._check_alive()
            if request.request_id in self._streams:
                from lmstack.errors import RequestError

                raise RequestError(f"request_id {request.request_id!r} is already in use")
            self._streams[request.request_id] = stream
        self._post(("add", request, None))
        self.start()
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early (or being cancelled) aborts it."""
        stream = self.add_request(prompt, params, request_id, priority)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self._post(("abort", stream.request_id, None))

    async def complete(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> RequestOutput:
        """Run a request to the end and return its whole output (not streamed)."""
        final: RequestOutput | None = None
        async for out in self.generate(prompt, params, request_id, priority):
            final = out if final is None else _merge(final, out)
        return final

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once its blocks are free. Unknown or finished ids are ignored."""
        if self._thread is None or not self._thread.is_alive():
            return
        done = asyncio.get_running_loop().create_future()
        self._post(("abort", request_id, done))
        await done

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmstack-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        """Abort whatever is in flight, stop the loop and wait for the thread to exit."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an internal error: {self.error!r}")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    def _post(self, command: tuple) -> None:
        with self._cond:
            if not self._exited:
                self._commands.append(command)
                self._cond.notify()
                return
        self._answer_unrun(command)

    def _answer_unrun(self, command: tuple) -> None:
        """A command the engine thread will never run: end its stream or release its caller."""
        kind, payload, done = command
        if kind == "add":
            with self._cond:
                stream = self._streams.pop(payload.request_id, None)
            if stream is not None:
                stream.put(self._dead_error())
        if done is not None:
            _resolve_threadsafe(done)

    def _dead_error(self) -> EngineDeadError:
        if self.error is not None:
            return EngineDeadError(f"the engine stopped after an internal error: {self.error!r}")
        return EngineDeadError("the engine is shutting down")

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        finally:  # whatever ended the loop, nothing posted later or still queued may wait forever
            with self._cond:
                self._exited = True
                unrun = list(self._commands)
                self._commands.clear()
            for command in unrun:
                self._answer_unrun(command)

    def _loop(self) -> None:
        core = self.core
        while True:
            with self._cond:
                while not (self._commands or core.has_unfinished() or self._stopping):
                    self._cond.wait()
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            try:
                for command in commands:
                    self._apply(command)
                if stopping:
                    for request_id in list(core.requests):
                        self._apply(("abort", request_id, None))
                    self._stats = core.stats()
                    return
                outputs = core.step() if core.has_unfinished() else []
            except BaseException as err:  # a bug or an out-of-memory: fail every request, stay dead
                self._fail(err)
                return
            self._stats = core.stats()  # first, so a consumer never sees stats older than its output
            for out in outputs:
                self._deliver(out)

    def _apply(self, command: tuple) -> None:
        kind, payload, done = command
        if kind == "add":
            try:
                self.core.submit(payload)
            except Exception as err:
                stream = self._streams.pop(payload.request_id, None)
                if stream is not None:
                    stream.put(err)
        else:
            out = self.core.abort_request(payload)
            if out is not None:
                self._deliver(out)
        self._stats = self.core.stats()  # before `abort` returns, so callers see the freed blocks
        if done is not None:
            _resolve_threadsafe(done)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            with self._cond:
                self._streams.pop(out.request_id, None)
        stream.put(out)

    def _fail(self, err: BaseException) -> None:
        with self._cond:  # add_request checks `error` under this lock: no stream registers after this
            self.error = err
            streams = list(self._streams.values())
            self._streams.clear()
        dead = self._dead_error()
        for stream in streams:
            stream.put(dead)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _resolve_threadsafe(future: asyncio.Future) -> None:
    try:
        future.get_loop().call_soon_threadsafe(_resolve, future)
    except RuntimeError:  # its event loop is closed: nobody waits for it any more
        pass


def _merge(acc: RequestOutput, delta: RequestOutput) -> RequestOutput:
    """Append a streamed delta to the accumulated output."""
    for a, d in zip(acc.outputs, delta.outputs):
        a.token_ids = a.token_ids + d.token_ids
        if a.text is not None and d.text is not None:
            a.text += d.text
        if a.logprobs is not None and d.logprobs is not None:
            a.logprobs = a.logprobs + d.logprobs
            a.top_logprobs = (a.top_logprobs or []) + (d.top_logprobs or [])
        a.finish_reason, a.stop_reason = d.finish_reason, d.stop_reason
        a.cumulative_logprob = d.cumulative_logprob
    acc.finished = delta.finished
    acc.prompt_logprobs = delta.prompt_logprobs
    acc.prompt_top_logprobs = delta.prompt_top_logprobs
    acc.num_cached_tokens = delta.num_cached_tokens
    return acc

"""Running engine requests for an HTTP request: deadlines, metrics, safety, aborts, disconnects.

`run_prompt` drives one prompt through the engine and yields `Update`s (per-choice deltas
already passed through the output filter); `merge` interleaves several prompts of one HTTP
request. Leaving either early (client gone, timeout, content filter) closes the engine
stream, which aborts the request and frees its KV blocks. `SSEResponse` always watches for
the client's disconnect, whatever ASGI version the server speaks, and `until_disconnected`
does the same for non-streamed requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from lmstack.errors import LmstackError
from lmstack.infer.params import SamplingParams
from lmstack.serve.errors import APIError, ClientDisconnected


@dataclass
class Delta:
    """What one choice (sample `index` of a prompt) produced since the last update."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    refusal: str | None = None


@dataclass
class Update:
    deltas: list[Delta]
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    finished: bool = False


@dataclass
class PromptRun:
    """One prompt of an HTTP request, as the engine sees it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    num_generated: int = 0
    finish_reasons: dict[int, str] = field(default_factory=dict)


def engine_error(err: BaseException) -> APIError:
    """An engine exception -> the status a client should see."""
    if isinstance(err, LmstackError):
        too_long = "max_model_len" in str(err) or "KV blocks" in str(err)
        code = "context_length_exceeded" if too_long else "invalid_value"
        return APIError(400, str(err), code=code)
    if type(err).__name__ == "EngineDeadError":
        return APIError(503, f"the engine is not available: {err}", code="engine_unavailable")
    raise err


async def run_prompt(state: Any, run: PromptRun, ticket: Any, deadline: float) -> AsyncIterator[Update]:
    """Stream one prompt's updates until it finishes, the deadline passes or the consumer leaves."""
    engine, safety, n = state.engine, state.config.safety, run.params.n
    guards = [safety.output_guard() if safety is not None and safety.check_output else None for _ in range(n)]
    timer = state.metrics.timer(len(run.prompt_token_ids))
    stream = engine.generate(run.request_id, run.prompt_token_ids, run.params)
    started, timed_out, abort_task = False, False, None

    def on_deadline() -> None:  # one timer per request, not a timeout per token
        nonlocal timed_out, abort_task
        timed_out = True
        abort_task = asyncio.ensure_future(engine.abort(run.request_id))

    deadline_timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), on_deadline)
    try:
        async for out in stream:
            if timed_out:
                raise asyncio.TimeoutError
            if not started:
                started = True
                ticket.started()
            m = out.metrics
            queue_time = (m.first_scheduled_time - m.arrival_time) if m is not None and \
                m.first_scheduled_time is not None else None
            new_tokens = sum(len(c.token_ids) for c in out.outputs)
            run.num_generated += new_tokens
            timer.tokens(new_tokens, queue_time)
            deltas = []
            for c in out.outputs:
                if c.index in run.finish_reasons:
                    continue  # stopped by the content filter: the rest of it is never shown
                d = Delta(c.index, c.text or "", list(c.token_ids), c.logprobs, c.top_logprobs, c.finish_reason,
                          c.stop_reason)
                guard = guards[c.index]
                if guard is not None:
                    d.text = guard.feed(c.text or "", final=c.finish_reason is not None)
                    if guard.violation is not None:
                        d.finish_reason, d.stop_reason = "content_filter", None
                        d.refusal = guard.violation.user_message()
                        state.metrics.safety_refusal("output", guard.violation.category)
                if d.finish_reason is not None:
                    run.finish_reasons[c.index] = d.finish_reason
                deltas.append(d)
            finished = out.finished or len(run.finish_reasons) == n
            yield Update(deltas, out.prompt_logprobs, getattr(out, "prompt_top_logprobs", None), finished)
            if finished:
                break  # if the filter stopped every choice, closing the stream below aborts the request
        if timed_out:
            raise asyncio.TimeoutError
    except asyncio.TimeoutError:
        raise APIError(504, f"the request did not finish within the server's timeout of "
                       f"{state.config.limits.request_timeout:g} s (--request-timeout); ask for fewer tokens",
                       # the openai client retries 5xx (twice by default): the same generation would run
                       # again and time out again; this header (which it honours) says not to
                       code="request_timeout", headers={"x-should-retry": "false"}) from None
    except (LmstackError, RuntimeError) as err:
        raise engine_error(err) from None
    finally:
        deadline_timer.cancel()
        await stream.aclose()
        if not started:
            ticket.started()
        # a choice with no finish reason was cut short (client gone, timeout, error): the engine aborted it
        timer.finished([run.finish_reasons.get(j, "abort") for j in range(n)])


_DONE = object()


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (which, item); an error in one ends all of them."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None))
            await queue.put((i, _DONE, None))
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # handed to the consumer, which re-raises it
            await queue.put((i, None, err))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item, err = await queue.get()
            if err is not None:
                raise err
            if item is _DONE:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if task.cancelled():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected
    return task.result()


class SSEResponse(StreamingResponse):
    """Server-sent events that stop (closing the generator, so aborting its requests) on disconnect.

    Events that are ready together go out in one write: under load the event loop falls behind
    the engine, and one write per token per stream would then cost more than the tokens.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Any = None, **kwargs: Any):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kwargs.pop("headers", {})}
        super().__init__(content, headers=headers, **kwargs)
        self.on_close = on_close

    async def stream_response(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ready: asyncio.Queue = asyncio.Queue()

        async def produce() -> None:
            try:
                async for event in self.body_iterator:
                    ready.put_nowait(event)
            finally:
                ready.put_nowait(_DONE)

        producer = asyncio.ensure_future(produce())
        try:
            done = False
            while not done:
                events = [await ready.get()]
                while not ready.empty():
                    events.append(ready.get_nowait())
                done = events[-1] is _DONE
                body = "".join(e for e in events if e is not _DONE)
                if body:
                    await send({"type": "http.response.body", "body": body.encode("utf-8"), "more_body": True})
            await producer  # re-raise what the generator raised
        finally:
            if not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the connection broke while we wrote
                pass

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.ensure_future(stream())
        listening = asyncio.ensure_future(listen())
        try:
            await asyncio.wait({streaming, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, listening):
                task.cancel()
            await asyncio.gather(streaming, listening, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                self.on_close()
        if streaming.done() and not streaming.cancelled() and streaming.exception() is not None:
            raise streaming.exception()


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"

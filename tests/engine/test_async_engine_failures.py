"""AsyncEngine when things go wrong: a step that fails, a caller whose event loop is gone, a
request added while the engine dies. Nothing may hang, and one client may not kill the engine."""

import asyncio
import threading
import time

import pytest
import torch
from engine_helpers import prompts, tiny_model

from lmstack.engine import AsyncEngine, SamplingParams
from lmstack.engine.engine import EngineDeadError

LONG = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)


def failing_at(engine, step: int, error: BaseException, pause: float = 0.0,
               entered: threading.Event | None = None, release: threading.Event | None = None):
    """Make the engine's `step`-th forward raise `error`: after `pause` seconds, or once it has set
    `entered` and `release` is set (a hook the test drives, so nothing depends on timing)."""
    run, calls = engine.core.runner.run, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            if entered is not None:
                entered.set()
            if release is not None and not release.wait(30):
                raise RuntimeError("the test never released the failing step")
            time.sleep(pause)
            raise error
        return run(*args, **kwargs)

    engine.core.runner.run = failing


def test_an_abort_queued_behind_a_failing_step_returns():
    (prompt,) = prompts([6])
    entered, release = threading.Event(), threading.Event()

    async def main():
        engine = AsyncEngine(tiny_model("llama"), block_size=4, num_blocks=32)
        failing_at(engine, 3, torch.cuda.OutOfMemoryError("simulated OOM"), entered=entered, release=release)
        stream = engine.add_request(prompt, LONG, request_id="r")
        await stream.__anext__()
        await stream.__anext__()
        assert await asyncio.to_thread(entered.wait, 10), "step 3 never started"
        abort = asyncio.ensure_future(engine.abort("r"))  # posted while step 3 runs: it waits behind it
        await asyncio.sleep(0)  # the abort task runs up to its await: the command is queued
        assert not abort.done()
        release.set()  # step 3 raises, the engine dies
        await asyncio.wait_for(abort, timeout=5)
        assert isinstance(engine.error, torch.cuda.OutOfMemoryError)
        with pytest.raises(EngineDeadError, match="simulated OOM"):
            await asyncio.wait_for(stream.__anext__(), timeout=5)
        await asyncio.wait_for(engine.abort("r"), timeout=5)  # and once the thread is gone

    try:
        asyncio.run(main())
    finally:
        release.set()


def test_an_abort_from_a_closed_event_loop_does_not_kill_the_engine():
    (prompt,) = prompts([6])
    engine = AsyncEngine(tiny_model("llama"), block_size=4, num_blocks=64)
    run = engine.core.runner.run
    hold, held, release = threading.Event(), threading.Event(), threading.Event()

    def paced(*args, **kwargs):
        if hold.is_set():  # one step waits for the test: the engine answers no command meanwhile
            hold.clear()
            held.set()
            release.wait(30)
        time.sleep(0.05)
        return run(*args, **kwargs)

    engine.core.runner.run = paced
    result = {}

    def other_client():
        async def complete():
            return (await engine.complete(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                                          request_id="b")).outputs[0].finish_reason
        result["b"] = asyncio.run(complete())

    async def impatient_client():  # gives up on its abort; its loop then closes before the engine answers
        stream = engine.add_request(prompt, LONG, request_id="a")
        await stream.__anext__()
        hold.set()
        assert await asyncio.to_thread(held.wait, 10), "the engine never took another step"
        with pytest.raises(asyncio.TimeoutError):  # the engine is inside a step: it cannot answer yet
            await asyncio.wait_for(engine.abort("a"), timeout=0.001)

    worker = threading.Thread(target=other_client)
    worker.start()
    deadline, running = time.monotonic() + 30, 0
    while not running and worker.is_alive() and time.monotonic() < deadline:  # until "b" runs
        running = engine.stats().num_running
        time.sleep(0.01)
    assert running == 1, "the other client's request never started running"
    try:
        asyncio.run(impatient_client())
    finally:
        release.set()  # only now, with the impatient client's loop closed, may the engine answer it
    worker.join(timeout=60)
    assert result["b"] == "length" and engine.error is None and engine.is_healthy
    asyncio.run(engine.shutdown())


def test_a_request_added_while_the_engine_dies_gets_an_error_not_silence():
    (prompt,) = prompts([6])

    async def main():
        engine = AsyncEngine(tiny_model("llama"), block_size=4, num_blocks=32)
        failing_at(engine, 3, RuntimeError("simulated CUDA error"), pause=0.1)
        first = engine.add_request(prompt, LONG, request_id="r1")
        await first.__anext__()
        await first.__anext__()
        make = engine.core.make_request
        engine.core.make_request = lambda *a, **k: time.sleep(0.3) or make(*a, **k)  # a long prompt to tokenize
        try:
            second = engine.add_request(prompt, LONG, request_id="r2")  # the engine dies meanwhile
        except EngineDeadError as err:
            assert "simulated CUDA error" in str(err)
            return
        with pytest.raises(EngineDeadError, match="simulated CUDA error"):
            await asyncio.wait_for(second.__anext__(), timeout=5)

    asyncio.run(main())

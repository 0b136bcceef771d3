"""AsyncEngine: streamed deltas add up to the offline result, aborts free blocks at once, stats."""

import asyncio

from engine_helpers import alone, prompts, tiny_model

from lmstack.engine import AsyncEngine, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_streaming_concurrency_abort_and_stats():
    model = tiny_model("qwen3")
    ps = prompts([7, 12, 5, 9], seed=6)

    async def main():
        engine = AsyncEngine(model, block_size=4, num_blocks=48, max_num_batched_tokens=16, async_scheduling=True)

        async def collect(i, delay):
            await asyncio.sleep(delay)  # requests arrive while others are running
            deltas = [out async for out in engine.generate(ps[i], SamplingParams(max_tokens=8, **GREEDY))]
            return deltas

        results = await asyncio.gather(*(collect(i, 0.01 * i) for i in range(3)))
        for i, deltas in enumerate(results):
            assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
            tokens = [t for d in deltas for t in d.outputs[0].token_ids]
            assert len(deltas) > 1 and tokens == alone(model, ps[i], 8).outputs[0].token_ids
            assert deltas[-1].outputs[0].finish_reason == "length"
            m = deltas[-1].metrics
            assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time

        # abort: blocks are free as soon as `abort` returns, and the stream ends with "abort"
        stream = engine.add_request(ps[3], SamplingParams(max_tokens=40, **GREEDY), request_id="long")
        first = await stream.__anext__()
        assert engine.stats().kv_blocks_used > 0 and not first.finished
        await stream.abort()
        assert engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0
        rest = [out async for out in stream]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"

        # a consumer that is cancelled (client gone) aborts its request too
        async def consume():
            async for _ in engine.generate(ps[3], SamplingParams(max_tokens=150, **GREEDY)):
                pass

        task = asyncio.create_task(consume())
        for _ in range(1000):
            if engine.stats().num_running:
                break
            await asyncio.sleep(0.005)
        assert not task.done() and engine.stats().kv_blocks_used > 0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(200):
            if engine.stats().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
        assert stats.requests_finished_total == {"length": 3, "abort": 2}
        assert stats.generation_tokens_total >= 3 * 8 and stats.kv_blocks_total == 48
        full = await engine.complete(ps[0], SamplingParams(max_tokens=8, **GREEDY))
        assert full.outputs[0].token_ids == results[0][0].outputs[0].token_ids + [
            t for d in results[0][1:] for t in d.outputs[0].token_ids]
        await engine.shutdown()
        assert not engine.is_healthy

    asyncio.run(main())


def test_streamed_text_adds_up_to_the_offline_text():
    from test_engine import _text_setup

    from lmstack.engine import LLM

    model, tokenizer = _text_setup()
    params = SamplingParams(max_tokens=16, **GREEDY)
    offline = LLM(model, tokenizer, block_size=4, num_blocks=32).generate("the dog ran", params)[0].outputs[0]

    async def main():
        engine = AsyncEngine(model, tokenizer, block_size=4, num_blocks=32)
        pieces = [out.outputs[0].text async for out in engine.generate("the dog ran", params)]
        await engine.shutdown()
        return pieces

    pieces = asyncio.run(main())
    assert len(pieces) > 1 and "".join(pieces) == offline.text

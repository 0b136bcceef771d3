"""Bounded loopback load test: 64 concurrent streaming clients for 30 s, a third disconnecting mid-stream.

Afterwards every KV block is free, /health answers, and no request is lost: each one the
clients sent either finished, received an error, or was dropped on purpose by its client,
and the engine counted exactly as many finished-or-aborted requests as the server accepted.
Marked `slow` (about 35 s); `pytest -m "not slow"` skips it. LMSTACK_LOAD_SECONDS changes
the duration. Only 127.0.0.1 is contacted; every loop is bounded by the deadline.
"""

import asyncio
import json
import os
import random
import time

import httpx
import pytest
from serve_helpers import LiveServer, wait_idle

from lmstack.serve import ServeConfig, ServeLimits, create_app

CLIENTS = 64
SECONDS = float(os.environ.get("LMSTACK_LOAD_SECONDS", "30"))
WORDS = "the quick brown fox jumps over the lazy dog hello world serving models is fun".split()


async def _client(i: int, url: str, deadline: float, tally: dict, ttfts: list) -> None:
    rng = random.Random(i)
    disconnects = i % 3 == 0
    chat = i % 4 == 1
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0)) as http:
        while time.monotonic() < deadline:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
            body = {"max_tokens": rng.randint(8, 64), "stream": True, "ignore_eos": True, "temperature": 0.8}
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
            keep = rng.randint(1, 6) if disconnects else None
            tally["sent"] += 1
            start = time.perf_counter()
            try:
                async with http.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        tally["error"] += 1
                        continue
                    tally["accepted"] += 1
                    events, finish, first = 0, None, True
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            break
                        data = json.loads(line[6:])
                        if "error" in data:
                            finish = "error"
                            continue
                        if first and data["choices"]:
                            first = False
                            ttfts.append(time.perf_counter() - start)
                        events += 1
                        for choice in data["choices"]:
                            finish = choice.get("finish_reason") or finish
                        if keep is not None and events >= keep:
                            break  # leave mid-stream: closing the response drops the connection
                    if keep is not None and events >= keep and finish is None:
                        tally["disconnected"] += 1
                    elif finish == "error":
                        tally["error"] += 1
                    elif finish is not None:
                        tally["finished"] += 1
                    else:
                        tally["lost"] += 1
            except httpx.HTTPError as err:
                tally["lost"] += 1
                tally.setdefault("exceptions", []).append(repr(err))


@pytest.mark.slow
def test_64_streaming_clients_with_disconnects(engine):
    config = ServeConfig(model_names=["tiny"], limits=ServeLimits(max_waiting=CLIENTS))
    before = sum(engine.stats().requests_finished_total.values())
    tokens_before = engine.stats().generation_tokens_total
    with LiveServer(create_app(engine, config=config)) as live:
        tally = {k: 0 for k in ("sent", "accepted", "finished", "disconnected", "error", "lost")}
        ttfts: list[float] = []

        async def main() -> None:
            deadline = time.monotonic() + SECONDS
            await asyncio.gather(*(_client(i, live.url, deadline, tally, ttfts) for i in range(CLIENTS)))

        start = time.perf_counter()
        asyncio.run(main())
        elapsed = time.perf_counter() - start
        stats = wait_idle(engine, timeout=30)
        health = httpx.get(live.url + "/health")
        admission = live.state.admission
    ttfts.sort()
    figures = dict(tally, seconds=round(elapsed, 1), requests_per_s=round(tally["accepted"] / elapsed, 1),
                   output_tokens_per_s=round((stats.generation_tokens_total - tokens_before) / elapsed),
                   ttft_p50_ms=round(1000 * ttfts[len(ttfts) // 2]), ttft_p99_ms=round(1000 * ttfts[int(len(ttfts) * .99)]))
    print("\nload test:", figures)
    assert elapsed >= SECONDS
    assert tally["lost"] == 0, tally
    assert tally["sent"] == tally["finished"] + tally["disconnected"] + tally["error"]
    assert tally["finished"] > CLIENTS and tally["disconnected"] > CLIENTS // 3
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert not engine.core.requests
    assert health.status_code == 200
    assert admission.num_waiting == 0 and admission.num_in_flight == 0
    # the engine saw every accepted request end, finished or aborted: none is stuck or forgotten
    assert sum(stats.requests_finished_total.values()) - before == tally["accepted"]

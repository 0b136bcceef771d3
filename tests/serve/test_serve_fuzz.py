"""Property-based fuzzing of the OpenAPI schema (schemathesis): no 500, no crash.

Schemathesis reads the server's own /openapi.json and generates requests from it, both
valid ones and deliberately invalid ones (wrong types, out-of-range values, missing fields).
Every answer must be below 500, and afterwards the engine must be healthy and idle. The
engine here has a short context (64 tokens) so that valid requests stay cheap.
"""

import pytest
from serve_helpers import LiveServer, tiny_engine, wait_idle

from lmstack.serve import ServeConfig, create_app

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def fuzz_server(tiny_dir):
    import asyncio

    engine = tiny_engine(tiny_dir, max_model_len=64, num_blocks=256)
    with LiveServer(create_app(engine, config=ServeConfig(model_names=["tiny"]))) as live:
        yield live, engine
    asyncio.run(engine.shutdown())


def test_fuzzed_requests_never_get_a_500(fuzz_server):
    import httpx
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    live, engine = fuzz_server
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = {f"{op.method.upper()} {op.path}" for op in (r.ok() for r in schema.get_all_operations())}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings", "POST /tokenize",
            "POST /detokenize", "GET /v1/models", "GET /health", "GET /metrics"} <= operations
    strategy = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)
    seen: dict[int, int] = {}

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        response = case.call(base_url=live.url, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.status_code,
                                            response.text[:500])

    check()
    assert seen.get(200, 0) > 10 and seen.get(400, 0) > 10, seen  # both kinds of request were really tried
    assert httpx.get(live.url + "/health").status_code == 200
    assert engine.is_healthy
    assert wait_idle(engine).kv_blocks_used == 0

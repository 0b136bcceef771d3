"""The server over a CUDA engine: greedy text and logprobs still match transformers (fp32 on GPU)."""

import math

import pytest
import torch

pytest.importorskip("fastapi")  # GPU machines may lack the serve extras; tests/run_cuda.py names this file

from serve_helpers import LiveServer, reference_greedy, reference_logprobs, tiny_engine  # noqa: E402

from lmstack.serve import ServeConfig, create_app  # noqa: E402


@pytest.mark.cuda
def test_openai_client_on_a_cuda_engine(tiny_dir, hf_reference):
    import asyncio

    import openai

    model, tok = hf_reference
    engine = tiny_engine(tiny_dir, device="cuda", dtype="float32", num_blocks=None, gpu_memory_utilization=0.2)
    try:
        with LiveServer(create_app(engine, config=ServeConfig(model_names=["tiny"]))) as live:
            with openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0) as client:
                ids = tok.encode("The quick brown fox").ids
                out = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, logprobs=1)
                generated = reference_greedy(model, ids, 12)
                assert out.choices[0].text == tok.decode(generated, skip_special_tokens=True)
                ref = reference_logprobs(model, ids + generated)
                for i, t in enumerate(generated):
                    got = out.choices[0].logprobs.token_logprobs[i]
                    assert math.isclose(got, ref[len(ids) - 1 + i, t].item(), abs_tol=1e-3)
                chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                             max_tokens=16, stream=True))
                assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        asyncio.run(engine.shutdown())
        torch.cuda.empty_cache()

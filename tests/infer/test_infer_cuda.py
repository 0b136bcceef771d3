"""CUDA: the compiled path (static cache, CUDA-graph decode, bucketed prefill) equals the eager one.

Run on a GPU machine: `pytest -m cuda tests/infer/test_infer_cuda.py`.
"""

import pytest
import torch
from hf_models import randomize_

import lmstack
from lmstack.infer import CompiledDecoder, Decoder, GenerationConfig, generate

pytestmark = pytest.mark.cuda

PROMPTS = [[5, 9, 11, 3, 8, 40, 41], [7, 7], [100 + i for i in range(40)]]


def _model(family, dtype=torch.float32):
    model, _ = lmstack.load(f"tiny-{family}", random_init=True, seed=0)
    return randomize_(model, seed=1, std=0.15).eval().to("cuda", dtype)


def _tokens(results):
    return [[o.token_ids for o in r.outputs] for r in results]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "mistral", "mixtral"])
def test_compiled_decoding_equals_eager_fp32(family):
    model = _model(family)
    fast = CompiledDecoder(model, compile=True, prefill_buckets=(16, 64), tune=False)
    # same batch and length for both configs: the second replays the first one's graphs
    for config in [GenerationConfig(max_new_tokens=24, eos_token_ids=[]),
                   GenerationConfig(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3, eos_token_ids=[])]:
        eager = generate(model, PROMPTS, config, decoder=Decoder(model))
        compiled = generate(model, PROMPTS, config, decoder=fast)
        again = generate(model, PROMPTS, config, decoder=fast)  # graphs replayed, not re-recorded
        assert _tokens(compiled) == _tokens(eager) == _tokens(again)


def test_compiled_beam_search_equals_eager():
    model = _model("llama")
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=[], num_beams=3, n=2)
    eager = generate(model, PROMPTS, config, decoder=Decoder(model))
    compiled = generate(model, PROMPTS, config, decoder=CompiledDecoder(model, prefill_buckets=(64,), tune=False))
    assert _tokens(compiled) == _tokens(eager)


@torch.inference_mode()
def test_compiled_bf16_logits_close_to_eager():
    model = _model("llama", torch.bfloat16)
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    fast, eager = CompiledDecoder(model, compile=True, tune=False), Decoder(model)
    for dec in (fast, eager):
        dec.start(1, 64)
    a, b = fast.prefill(ids).float(), eager.prefill(ids).float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    for token in [3, 17, 200, 45]:
        t = torch.tensor([token], device="cuda")
        a, b = fast.decode(t).float(), eager.decode(t).float()
        assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize("method", ["int8", "int4", "float8"])
def test_quantized_models_generate_on_cuda(method):
    pytest.importorskip("torchao")
    from lmstack.infer.quantize import quantize

    if method == "float8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability >= 8.9")
    model = _model("llama", torch.bfloat16)
    ref = _model("llama", torch.bfloat16)
    quantize(model, method, group_size=64)
    ids = torch.randint(0, 256, (2, 12), device="cuda")
    with torch.no_grad():
        diff = (model(ids).logits.float() - ref(ids).logits.float()).abs().max().item()
        scale = ref(ids).logits.float().abs().max().item()
    assert diff < {"int8": 0.1, "float8": 0.2, "int4": 0.8}[method] * scale
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=[])
    eager = generate(model, PROMPTS[:2], config, decoder=Decoder(model))
    # Teacher-forced: the compiled path reads the eager path's tokens, and each of them must be
    # (within bf16 rounding of) its own best choice. Comparing free-running outputs instead would
    # fail on the first near-tie, after which the two continuations are unrelated.
    fast = CompiledDecoder(model, tune=False)
    with torch.inference_mode():
        for prompt, result in zip(PROMPTS[:2], eager):
            tokens = result.outputs[0].token_ids
            fast.start(1, len(prompt) + len(tokens))
            logits = fast.prefill(torch.tensor([prompt], device="cuda"))[0].float()
            for token in tokens:
                assert logits[token] >= logits.max() - 0.05 * logits.abs().max()
                logits = fast.decode(torch.tensor([token], device="cuda"))[0].float()

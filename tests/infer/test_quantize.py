"""Weight-only quantization (torchao): error bounds against float64, every Linear used, round trip."""

import json

import pytest
import torch
from hf_models import randomize_

import lmstack
from lmstack.errors import ConfigError
from lmstack.infer.quantize import quantize, save_quantized

pytest.importorskip("torchao")


def _model(family="llama"):
    model, _ = lmstack.load(f"tiny-{family}", random_init=True, seed=0)
    return randomize_(model, seed=1, std=0.15).eval()


def _dense_linears(model):
    return {n: m.weight.detach().clone().double() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("router")}


@pytest.mark.parametrize("method,levels,group", [("int8", 127, None), ("int4", 7, 32)])
def test_dequantized_weights_within_half_a_step(method, levels, group):
    """|dequant(W) - W| <= half a quantization step of each row (int8) or group (int4), in float64."""
    model = _model("qwen2")  # tied embeddings: the head gets its own quantized copy
    dense = _dense_linears(model)
    quantize(model, method, group_size=group or 128)
    assert model.lm_head.weight is not model.embed.weight
    for name, module in model.named_modules():
        if name not in dense:
            continue
        w = dense[name]
        q = module.weight
        assert type(q).__name__ != "Parameter" and type(q) is not torch.Tensor, f"{name} was not quantized"
        deq = q.dequantize().double()
        blocks = w.reshape(w.shape[0], -1, group or w.shape[1])
        step = blocks.abs().amax(-1, keepdim=True) / levels
        err = (deq.reshape_as(blocks) - blocks).abs()
        assert (err <= step / 2 * 1.02 + 1e-6).all(), f"{name}: error beyond half a step"


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_forward_equals_float64_forward_with_dequantized_weights(method):
    """The quantized kernels compute with exactly the weights they dequantize to, to fp32 rounding:
    measured 3-5e-6 (logits up to ~5) for both methods over six inputs, against 0.12 (int8) and
    4.3 (int4) between the float64 forwards with and without quantization."""
    model = _model("mixtral")
    quantize(model, method, group_size=32)
    ref = _model("mixtral").double()
    with torch.no_grad():
        for (_, m), (_, r) in zip(model.named_modules(), ref.named_modules()):
            if isinstance(m, torch.nn.Linear):
                w = m.weight.dequantize() if hasattr(m.weight, "dequantize") else m.weight
                r.weight = torch.nn.Parameter(w.detach().double())
        ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
        diff = (model(ids).logits.double() - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_save_and_load_round_trip(tmp_path):
    model = _model("llama")
    quantize(model, "int8")
    save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert config["architectures"] == ["LlamaForCausalLM"]
    loaded, _ = lmstack.load(tmp_path)
    assert type(loaded.layers[0].attn.qkv.weight).__name__ == "Int8Tensor"
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_bad_method_and_group_size():
    with pytest.raises(ConfigError, match="'int3' is not one of int8, int4, float8"):
        quantize(_model(), "int3")
    with pytest.raises(ConfigError, match="group_size=48"):
        quantize(_model(), "int4", group_size=48)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="float8 weights need a CUDA GPU"):
            quantize(_model(), "float8")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_model_with_padded_vocabulary_rows_round_trips(tmp_path, method):
    """Training pads the embedding to a multiple of 64 rows by default; config.json's
    vocab_size omits them, so the quantized directory records the padding (it failed to load)."""
    import dataclasses

    from lmstack.config import get_preset

    config = dataclasses.replace(get_preset("tiny-qwen2"), vocab_size=250, pad_vocab_to_multiple=64)
    model = randomize_(lmstack.load("tiny-qwen2", random_init=True, seed=0, config=config)[0], seed=1, std=0.15).eval()
    assert model.embed.weight.shape[0] == 256
    quantize(model, method, group_size=32)
    save_quantized(model, tmp_path)
    loaded, _ = lmstack.load(tmp_path)
    ids = torch.randint(0, 250, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_int4_that_would_quantize_nothing_is_refused_and_kept_layers_are_named():
    model = _model()  # tiny: input sizes 64 (hidden) and 128 (the MLP's down projection)
    with pytest.raises(ConfigError, match=r"group_size=256 divides none of this model's layer input sizes \[64, 128\]"):
        quantize(model, "int4", group_size=256)
    quantize(model, "int4", group_size=128)  # only the down projections fit: the rest is kept and named
    kept = model.config.extra["quantization_config"]["lmstack"]["kept"]
    assert kept and not any(name.endswith("mlp.down") for name in kept) and "lm_head" in kept
    assert type(model.layers[0].mlp.down.weight) is not torch.nn.Parameter
    assert type(model.layers[0].attn.qkv.weight) is torch.nn.Parameter


def test_importing_torchao_prints_no_noise_about_kernels_lmstack_does_not_use():
    """torchao logs "Failed to load ..._C_mxfp8" (and torch a pytree deprecation) at import; quantize
    and every load of a quantized model used to print them."""
    import subprocess
    import sys

    code = "from lmstack.infer.quantize import _torchao; _torchao(); import logging; " \
           "assert logging.getLogger('torchao').level == logging.NOTSET"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Failed to load" not in out.stderr and "_pytree" not in out.stderr, out.stderr

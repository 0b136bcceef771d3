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
    model = _model("mixtral")
    quantize(model, method, group_size=32)
    ref = _model("mixtral").double()
    with torch.no_grad():
        for (_, m), (_, r) in zip(model.named_modules(), ref.named_modules()):
            if isinstance(m, torch.nn.Linear):
                w = m.weight.dequantize() if hasattr(m.weight, "dequantize") else m.weight
                r.weight = torch.nn.Parameter(w.detach().double())
        ids = torch.randint(0, 256, (2, 9))
        diff = (model(ids).logits.double() - ref(ids).logits).abs().max().item()
    assert diff < 2e-3


def test_save_and_load_round_trip(tmp_path):
    model = _model("llama")
    quantize(model, "int8")
    save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert config["architectures"] == ["LlamaForCausalLM"]
    loaded, _ = lmstack.load(tmp_path)
    assert type(loaded.layers[0].attn.qkv.weight).__name__ == "Int8Tensor"
    ids = torch.randint(0, 256, (1, 10))
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

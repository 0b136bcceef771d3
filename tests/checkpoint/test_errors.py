"""Bad checkpoints give an lmstack error that names the file, tensor or field at fault."""

import json
import shutil

import pytest
import torch
from hf_models import hf_model
from safetensors.torch import load_file, save_file

import lmstack
from lmstack.errors import CheckpointError


@pytest.fixture
def llama_dir(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_corrupted_safetensors_file(llama_dir):
    path = llama_dir / "model.safetensors"
    path.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not a header" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        lmstack.load(llama_dir)


def test_truncated_safetensors_file(llama_dir):
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        lmstack.load(llama_dir)


def test_config_with_missing_field(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    del config["num_hidden_layers"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json has no 'num_hidden_layers' field"):
        lmstack.load(llama_dir)


def test_config_that_is_not_json(llama_dir):
    (llama_dir / "config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        lmstack.load(llama_dir)


def test_directory_without_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model\.safetensors"):
        lmstack.load(llama_dir)


def test_pickled_weights_are_refused(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, llama_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: lmstack never loads pickled weights"):
        lmstack.load(llama_dir)


def test_unknown_architecture(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"architecture FalconForCausalLM is not supported"):
        lmstack.load(llama_dir)


def test_missing_tensor_names_tensor(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' is missing"):
        lmstack.load(llama_dir)


def test_unexpected_tensor_names_tensor_and_file(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra_proj\.weight' in .*model\.safetensors"):
        lmstack.load(llama_dir)


def test_wrong_shape_names_tensor(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"k_proj.*has shape .*config\.json implies"):
        lmstack.load(llama_dir)


def test_missing_shard_of_sharded_checkpoint(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "m", max_shard_size="20KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard {shard.name} .* the file is missing"):
        lmstack.load(tmp_path / "m")


def test_not_a_directory_nor_preset(tmp_path):
    with pytest.raises(CheckpointError, match=r"'nope' is neither a model directory nor a preset"):
        lmstack.load("nope")
    with pytest.raises(CheckpointError, match=r"preset .* pass random_init=True"):
        lmstack.load("llama-3.2-1b")


def test_resave_in_place_removes_stale_shards(tmp_path):
    model, _ = lmstack.load("tiny-llama", random_init=True)
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("family, change, message", [
    ("llama", dict(attn_qkv_bias=True), r"attn_qkv_bias=True \(a LlamaForCausalLM config.json loads it as False\)"),
    ("qwen2", dict(attn_qkv_bias=False), r"attn_qkv_bias=False \(a Qwen2ForCausalLM config.json loads it as True\)"),
    # MixtralForCausalLM applies sliding_window to every layer (Mistral's layer_types are saved: test_config_roundtrip)
    ("mixtral", dict(sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
     r"layer_types / sliding_window="),
])
def test_saving_a_model_its_architecture_cannot_hold_is_refused(tmp_path, family, change, message):
    model = lmstack.Transformer(lmstack.get_preset(f"tiny-{family}").replace(**change))
    with pytest.raises(CheckpointError, match=f"cannot save to {tmp_path / 'out'}: .*{message}"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("edit, message", [
    (lambda w: [], r"index\.json: \"weight_map\" must be an object \{tensor name: shard file\}, got list"),
    (lambda w: {**w, next(iter(w)): None}, r"index\.json: \"weight_map\" entry '.+' must name a shard file .* got None"),
    (lambda w: {**w, next(iter(w)): 3}, r"\"weight_map\" entry '.+' must name a shard file .* got 3"),
])
def test_malformed_weight_map_names_file_and_field(tmp_path, edit, message):
    hf_model("llama").save_pretrained(tmp_path / "m", max_shard_size="20KB")
    path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"] = edit(index["weight_map"])
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        lmstack.load(tmp_path / "m")


# ---- the dtype a checkpoint loads in, and weights that are not floating point -------------------


def _rewrite(directory, edit):
    path = directory / "model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


def test_one_odd_tensor_does_not_decide_the_dtype(llama_dir):
    _rewrite(llama_dir, lambda w: w.update({"lm_head.weight": w["lm_head.weight"].double()}))
    assert lmstack.load(llama_dir)[0].dtype == torch.float32  # config.json says float32; not float64
    assert lmstack.load(llama_dir, dtype=torch.float64)[0].dtype == torch.float64  # only when asked for


@pytest.mark.parametrize("declared, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), (..., None)])
def test_config_json_dtype_decides_else_the_most_common_floating_dtype(llama_dir, declared, expected):
    """As transformers' dtype="auto": config.json's dtype; without one, what most weights are stored in."""
    _rewrite(llama_dir, lambda w: w.update({k: v.to(torch.bfloat16) for k, v in w.items() if "layers" in k}))
    config = json.loads((llama_dir / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    if declared is not ...:
        config["dtype"] = declared
    (llama_dir / "config.json").write_text(json.dumps(config))
    model, _ = lmstack.load(llama_dir)
    assert model.dtype == (expected or torch.bfloat16)  # the layers outweigh embeddings, norm and head here
    assert model.config.dtype == str(model.dtype).removeprefix("torch.")


def test_an_integer_weight_is_named_not_cast(llama_dir):
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite(llama_dir, lambda w: w.update({name: (w[name] * 100).to(torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in .*model\.safetensors is stored as torch\.int32, "
                                              r"but layers\.1\.mlp\.down\.weight is a floating-point weight"):
        lmstack.load(llama_dir)

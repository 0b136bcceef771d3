"""A config.json with wrong types, incomplete fields or out-of-range values, a tokenizer or embedding
that does not fit it, and a quantized directory where unquantized weights are needed: each is a
CheckpointError naming the file and the field, never a traceback or a silently different model."""

import json

import pytest
import torch
from hf_models import hf_model

import lmstack
from lmstack.checkpoint.hf import load_hf_model
from lmstack.checkpoint.hf_config import read_config
from lmstack.errors import CheckpointError
from lmstack.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question. " * 20


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def saved(tmp_path, family, name="m", **overrides):
    hf_model(family, **overrides).save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.fixture(scope="module")
def tokenizer_305():
    tokenizer = Tokenizer.train([TEXT], vocab_size=300, min_frequency=1)
    assert tokenizer.vocab_size == 305
    return tokenizer


# ---- the tokenizer and the embedding must fit vocab_size ------------------------------------


def test_tokenizer_larger_than_vocab_size_is_refused(tmp_path, tokenizer_305):
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)  # vocab_size 256
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer_305)
    with pytest.raises(CheckpointError, match=r"m: tokenizer\.json has 305 tokens but config\.json vocab_size=256; "
                                              r"the tokenizer does not belong to this model"):
        lmstack.load(tmp_path / "m")


def test_tokenizer_smaller_than_padded_vocab_size_loads(tmp_path, tokenizer_305):
    config = lmstack.get_preset("tiny-llama").replace(vocab_size=320)  # models pad their vocabulary
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0, config=config)
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer_305)
    loaded, tokenizer = lmstack.load(tmp_path / "m")
    assert loaded.config.vocab_size == 320 and tokenizer.vocab_size == 305


def test_vocab_size_larger_than_the_embedding_is_refused_not_zero_padded(tmp_path):
    config = lmstack.get_preset("tiny-llama").replace(vocab_size=305)
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0, config=config)
    model.save_pretrained(tmp_path / "m")
    edit_config(tmp_path / "m", vocab_size=400)
    with pytest.raises(CheckpointError, match=r"tensor model\.embed_tokens\.weight in .*model\.safetensors has shape "
                                              r"\(305, 64\), but config\.json implies \(400, 64\)"):
        lmstack.load(tmp_path / "m")


def test_vocab_size_smaller_than_the_embedding_is_refused(tmp_path):
    directory = saved(tmp_path, "qwen2")  # tied: only the embedding is stored
    edit_config(directory, vocab_size=90)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight .* has shape \(97, 32\), but config\.json "
                                              r"implies \(90, 32\)"):
        lmstack.load(directory)


def test_lmstack_vocab_padding_still_loads(tmp_path):
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0, config=lmstack.get_preset("tiny-llama").replace(
        vocab_size=250))
    model.save_pretrained(tmp_path)
    padded = load_hf_model(tmp_path, config=read_config(tmp_path).replace(pad_vocab_to_multiple=64))
    assert padded.embed.weight.shape[0] == 256 and padded.lm_head.weight.shape[0] == 256
    assert torch.equal(padded.embed.weight[:250], model.embed.weight)
    assert not padded.embed.weight[250:].any()
    ids = torch.randint(0, 250, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(padded(ids).logits, model(ids).logits, atol=1e-6)


# ---- booleans are JSON booleans -----------------------------------------------------------------


@pytest.mark.parametrize("family,field,value", [
    ("llama", "tie_word_embeddings", "false"),
    ("llama", "attention_bias", "false"),
    ("llama", "mlp_bias", "true"),
    ("qwen2", "use_sliding_window", "false"),
    ("qwen2", "tie_word_embeddings", 1),
    ("gpt2", "tie_word_embeddings", "true"),
    ("gpt2", "scale_attn_weights", "true"),
    ("llama", "attention_bias", None),
])
def test_boolean_fields_must_be_true_or_false(tmp_path, family, field, value):
    directory = saved(tmp_path, family)
    edit_config(directory, **{field: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: {field} must be true or false, got {value!r}"):
        lmstack.load(directory)


def test_untied_model_with_string_false_keeps_its_lm_head(tmp_path):
    """The defect: "false" counted as true, the model loaded tied and its lm_head was dropped."""
    directory = saved(tmp_path, "llama")
    edit_config(directory, tie_word_embeddings="false")
    with pytest.raises(CheckpointError, match="tie_word_embeddings must be true or false"):
        load_hf_model(directory)
    edit_config(directory, tie_word_embeddings=False)
    model = load_hf_model(directory)
    assert model.lm_head.weight is not model.embed.weight


# ---- numbers, rope_scaling and the shape of the file --------------------------------------------


@pytest.mark.parametrize("family,changes,message", [
    ("llama", {"rope_parameters": ..., "rope_theta": "abc"}, r"rope_theta must be a positive number, got 'abc'"),
    ("llama", {"rope_parameters": ..., "rope_theta": None}, r"rope_theta must be a positive number, got None"),
    ("llama", {"rms_norm_eps": None}, r"rms_norm_eps must be a positive number, got None"),
    ("llama", {"rms_norm_eps": "x"}, r"rms_norm_eps must be a positive number, got 'x'"),
    ("gpt2", {"layer_norm_epsilon": "1e-5"}, r"layer_norm_epsilon must be a positive number, got '1e-5'"),
    ("llama", {"hidden_size": "32"}, r"hidden_size must be a positive integer, got '32'"),
    ("llama", {"num_hidden_layers": 2.0}, r"num_hidden_layers must be a positive integer, got 2\.0"),
    ("llama", {"num_key_value_heads": "2"}, r"num_key_value_heads must be a positive integer or null, got '2'"),
    ("llama", {"max_position_embeddings": 0}, r"max_position_embeddings must be a positive integer, got 0"),
    ("gpt2", {"n_head": True}, r"n_head must be a positive integer, got True"),
    ("mistral", {"sliding_window": "5"}, r"sliding_window must be a positive integer or null, got '5'"),
    ("mixtral", {"num_experts_per_tok": "2"}, r"num_experts_per_tok must be a positive integer, got '2'"),
    ("mixtral", {"router_aux_loss_coef": "0.01"}, r"router_aux_loss_coef must be a number, got '0\.01'"),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": "1", "layer_types": ...},
     r"max_window_layers must be an integer, got '1'"),
    ("qwen2", {"layer_types": "full_attention"}, r"layer_types must be a list of \"full_attention\""),
    ("llama", {"rope_parameters": ..., "rope_scaling": {"rope_type": "linear"}},
     r"rope_scaling with rope_type 'linear' needs the keys factor; missing factor"),
    ("llama", {"rope_parameters": ..., "rope_scaling": {"type": "linear", "factor": "2"}}, r"rope_scaling\.factor must be a positive number, "
                                                                   r"got '2'"),
    ("llama", {"rope_parameters": ..., "rope_scaling": {"rope_type": "llama3", "factor": "8"}},
     r"rope_scaling with rope_type 'llama3' needs the keys factor, low_freq_factor, high_freq_factor, "
     r"original_max_position_embeddings; missing low_freq_factor, high_freq_factor$"),  # the last defaults as in HF
    ("llama", {"rope_parameters": ..., "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16}},
     r"rope_scaling\.low_freq_factor must be a positive number, got 0"),
    ("llama", {"rope_parameters": ..., "rope_scaling": "llama3"}, r"rope_scaling must be an object like .* or null, got 'llama3'"),
    ("llama", {"rope_parameters": ..., "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling type 'yarn' is not supported"),
    ("llama", {"rope_scaling": ..., "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}},
     r"rope_parameters with rope_type 'linear' needs the keys factor"),
    ("llama", {"rope_scaling": ..., "rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}},
     r"rope_parameters: rope_theta must be a positive number, got '1e4'"),
    ("llama", {"rope_parameters": "default"}, r"rope_parameters must be an object"),
    ("llama", {"architectures": "LlamaForCausalLM"}, r"architectures must be a list of class names"),
    ("llama", {"architectures": [], "model_type": ["llama"]}, r"architectures? .* is not supported"),
])
def test_wrong_typed_or_incomplete_fields(tmp_path, family, changes, message):
    directory = saved(tmp_path, family)
    edit_config(directory, **changes)
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        lmstack.load(directory)


@pytest.mark.parametrize("content", [[1, 2], "config", 3])
def test_config_json_that_is_not_an_object(tmp_path, content):
    directory = saved(tmp_path, "llama")
    (directory / "config.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=rf"config\.json must hold a JSON object, got {type(content).__name__}"):
        lmstack.load(directory)


def test_complete_rope_scaling_still_loads(tmp_path):
    directory = saved(tmp_path, "llama")
    assert lmstack.load(directory)[0].config.rope_scaling["rope_type"] == "llama3"  # every llama3 key given
    edit_config(directory, rope_parameters=..., rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2})
    assert lmstack.load(directory)[0].config.rope_scaling == {"rope_type": "linear", "factor": 2}


# ---- special token ids --------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("eos_token_id", 999, r"eos_token_id=999 is outside the vocabulary \[0, 97\)"),
    ("bos_token_id", -5, r"bos_token_id=-5 is outside the vocabulary \[0, 97\)"),
    ("pad_token_id", 97, r"pad_token_id=97 is outside the vocabulary \[0, 97\)"),
    ("eos_token_id", [3, 101], r"eos_token_id=\[3, 101\] is outside the vocabulary \[0, 97\)"),
    ("eos_token_id", [301, "x"], r"eos_token_id must be an integer or a list of integers \(or null\), "
                                 r"got \[301, 'x'\]"),
    ("bos_token_id", "1", r"bos_token_id must be an integer \(or null\), got '1'"),
    ("pad_token_id", [0], r"pad_token_id must be an integer \(or null\), got \[0\]"),
    ("bos_token_id", True, r"bos_token_id must be an integer \(or null\), got True"),
])
def test_special_token_ids_must_be_in_the_vocabulary(tmp_path, field, value, message):
    directory = saved(tmp_path, "llama")
    edit_config(directory, **{field: value})
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        lmstack.load(directory)


def test_valid_special_token_ids_load(tmp_path):
    directory = saved(tmp_path, "llama")
    edit_config(directory, bos_token_id=0, eos_token_id=[1, 96], pad_token_id=None)
    config = lmstack.load(directory)[0].config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, [1, 96], None)
    edit_config(directory, pad_token_id=-1)  # some published configs say "no padding token" so
    assert lmstack.load(directory)[0].config.pad_token_id is None


# ---- a directory written by `lmstack quantize` --------------------------------------------------


@pytest.fixture
def quantized_dir(tmp_path, tokenizer_305):
    pytest.importorskip("torchao")
    from lmstack.infer.quantize import quantize, save_quantized

    config = lmstack.get_preset("tiny-llama").replace(vocab_size=305)
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0, config=config)
    model.save_pretrained(tmp_path / "orig", tokenizer=tokenizer_305)
    quantize(model, "int8")
    save_quantized(model, tmp_path / "q", tokenizer_305)
    return tmp_path / "q"


def test_quantized_directory_is_refused_where_unquantized_weights_are_needed(tmp_path, quantized_dir):
    from lmstack.cli.convert import convert

    needs = r"holds int8-quantized weights \(written by lmstack quantize\); .* needs the unquantized model: pass the " \
            r"original directory"
    with pytest.raises(CheckpointError, match=rf"{quantized_dir} {needs}"):
        load_hf_model(quantized_dir)  # what training --model and resuming load with
    with pytest.raises(CheckpointError, match=rf"{quantized_dir} {needs}"):
        lmstack.Transformer.from_pretrained(quantized_dir)
    with pytest.raises(CheckpointError, match=rf"{quantized_dir} {needs}"):
        convert(str(quantized_dir), str(tmp_path / "converted"))
    assert not (tmp_path / "converted").exists()


def test_quantized_directory_still_loads_for_inference(quantized_dir):
    model, tokenizer = lmstack.load(quantized_dir)
    assert type(model.layers[0].attn.qkv.weight).__name__ == "Int8Tensor" and tokenizer.vocab_size == 305
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 305)


def test_foreign_quantization_config_is_refused(tmp_path):
    directory = saved(tmp_path, "llama")
    edit_config(directory, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(CheckpointError, match=r"holds weights quantized with 'gptq' \(config\.json "
                                              r"quantization_config\); lmstack loads unquantized safetensors"):
        lmstack.load(directory)


def test_is_quantized_dir_on_a_config_that_is_a_list(tmp_path):
    from lmstack.infer.quantize import is_quantized_dir

    directory = saved(tmp_path, "llama")
    (directory / "config.json").write_text("[1, 2]")
    assert not is_quantized_dir(directory)
    with pytest.raises(CheckpointError, match=r"config\.json must hold a JSON object, got list"):
        lmstack.load(directory)


# ---- ModelConfig itself (presets, overrides, configs built in code) -----------------------------


@pytest.mark.parametrize("changes,message", [
    ({"family": "mixtral", "mlp": "moe", "num_experts": 4, "num_experts_per_tok": "2"},
     r"num_experts_per_tok must be an integer, got '2'"),
    ({"tie_embeddings": "false"}, r"tie_embeddings must be true or false, got 'false'"),
    ({"norm_eps": None}, r"norm_eps must be a positive number, got None"),
    ({"rope_theta": "1e4"}, r"rope_theta must be a positive number, got '1e4'"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling with rope_type 'linear' needs the keys factor"),
    ({"hidden_size": "64"}, r"hidden_size must be a positive integer, got '64'"),
    ({"eos_token_id": [1, "x"]}, r"eos_token_id must be an integer, a list of integers or null, got \[1, 'x'\]"),
])
def test_model_config_checks_types(changes, message):
    from lmstack.config import ModelConfig
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


@pytest.mark.parametrize("family, field", [("llama", "intermediate_size"), ("gpt2", "n_inner")])
def test_a_config_shape_the_weights_do_not_have_is_named(tmp_path, family, field):
    directory = saved(tmp_path, family)
    edit_config(directory, **{field: 48})  # the weights were saved with 64
    with pytest.raises(CheckpointError, match=r"the checkpoint's weights for layers\.0\.mlp\.\w+\.weight have shape "
                                              r"\(\d+, \d+\), but config\.json implies \(\d+, \d+\); "
                                              r"the weights do not match config\.json"):
        lmstack.load(directory)

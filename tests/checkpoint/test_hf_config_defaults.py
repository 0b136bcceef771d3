"""config.json spellings and omissions mean here what they mean to transformers: rope_parameters /
rope_scaling resolved with transformers' precedence, and an absent non-shape field taking the
default of that architecture's transformers config class (not a generic one). Each case loads the
same directory in both libraries and compares the resolved config and the logits."""

import dataclasses
import json

import pytest
import torch
from hf_models import VOCAB, hf_model, token_ids

import lmstack
from lmstack.errors import CheckpointError

LINEAR = {"rope_type": "linear", "factor": 4.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _edit(directory, change):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _load_both(directory):
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    ours, _ = lmstack.load(directory)
    return theirs, ours.eval()


def _max_diff(theirs, ours, T=40, seed=1):
    ids = token_ids((2, T), seed=seed)
    with torch.no_grad():
        return (theirs(ids).logits - ours(ids).logits).abs().max().item()


def _theirs_windows(config):
    """The window of each layer as transformers' model applies it."""
    window = getattr(config, "sliding_window", None)  # LlamaConfig has none
    kinds = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    if config.model_type == "mixtral":  # MixtralForCausalLM ignores layer_types
        kinds = ["sliding_attention"] * config.num_hidden_layers
    return [window if k == "sliding_attention" else None for k in kinds]


# ---- rope_parameters (v5) and rope_scaling (v4) -------------------------------------------------

def _theta_at_top_level(config):  # {"rope_theta": 5e5, "rope_parameters": {"rope_type": ..., "factor": ...}}
    config["rope_theta"] = config["rope_parameters"].pop("rope_theta")


@pytest.mark.parametrize("scaling,change,expected_type,expected_theta", [
    (LINEAR, _theta_at_top_level, "linear", 500000.0),
    (LLAMA3, _theta_at_top_level, "llama3", 500000.0),
    # a non-empty rope_scaling replaces rope_parameters whole, its rope_theta included
    (None, lambda c: c.update(rope_scaling=dict(LINEAR)), "linear", 10000.0),
    (None, lambda c: c.update(rope_scaling=dict(LINEAR), rope_theta=300000.0), "linear", 300000.0),
    (LINEAR, lambda c: c.update(rope_scaling={"rope_type": "default"}), None, 10000.0),
    # an empty or null rope_scaling leaves rope_parameters in charge
    (LINEAR, lambda c: c.update(rope_scaling={}), "linear", 500000.0),
    (LINEAR, lambda c: c.update(rope_scaling=None), "linear", 500000.0),
    # rope_parameters' own rope_theta wins over a top-level one
    (LINEAR, lambda c: c.update(rope_theta=300000.0), "linear", 500000.0),
    # llama3 without original_max_position_embeddings: transformers takes max_position_embeddings
    (LLAMA3, lambda c: c["rope_parameters"].pop("original_max_position_embeddings"), "llama3", 500000.0),
])
def test_rope_spellings_resolve_as_in_transformers(tmp_path, scaling, change, expected_type, expected_theta):
    hf_model("llama", rope_scaling=dict(scaling) if scaling else None).save_pretrained(tmp_path)
    _edit(tmp_path, change)
    theirs, ours = _load_both(tmp_path)
    assert theirs.config.rope_parameters.get("rope_type") == (expected_type or "default")
    assert (ours.config.rope_scaling or {}).get("rope_type") == expected_type
    assert ours.config.rope_theta == theirs.config.rope_parameters["rope_theta"] == expected_theta
    assert _max_diff(theirs, ours) <= 1e-4


def test_per_layer_type_rope_parameters_are_refused(tmp_path):
    hf_model("mistral", layer_types=["full_attention", "sliding_attention"]).save_pretrained(tmp_path)
    _edit(tmp_path, lambda c: c.update(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                        "sliding_attention": dict(LINEAR, rope_theta=1e4)}))
    with pytest.raises(CheckpointError, match=r"config\.json: rope_parameters holds per-layer-type RoPE "
                                                      r"settings \(full_attention, sliding_attention\)"):
        lmstack.load(tmp_path)


# ---- absent fields: the architecture's transformers defaults ------------------------------------

@pytest.mark.parametrize("family,overrides,dropped", [
    ("mixtral", {}, ["rope_parameters"]),  # rope_theta 1e6, not 1e4
    ("mixtral", {}, ["rms_norm_eps"]),  # 1e-5, not 1e-6
    ("mixtral", {"sliding_window": 6}, ["sliding_window", "max_position_embeddings"]),  # no window; 131072
    ("mistral", {}, ["sliding_window", "max_position_embeddings"]),  # window 4096; 131072
    ("llama", {"rms_norm_eps": 1e-3}, ["rms_norm_eps", "max_position_embeddings"]),  # 1e-6; 2048
    ("qwen2", {}, ["max_position_embeddings"]),  # 32768
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
     ["sliding_window", "max_window_layers", "layer_types"]),  # window 4096 from layer 28 on: none here
    ("qwen3", {"head_dim": 128}, ["head_dim"]),  # a shape transformers fills with 128, not hidden / heads
])
def test_absent_fields_take_the_transformers_class_defaults(tmp_path, family, overrides, dropped):
    hf_model(family, **overrides).save_pretrained(tmp_path)
    _edit(tmp_path, lambda c: [c.pop(k) for k in dropped])
    theirs, ours = _load_both(tmp_path)
    hf, cfg = theirs.config, ours.config
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.norm_eps == hf.rms_norm_eps
    assert cfg.max_position_embeddings == hf.max_position_embeddings
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert [cfg.window_for_layer(i) for i in range(cfg.num_layers)] == _theirs_windows(hf)
    assert _max_diff(theirs, ours, T=20) <= 1e-4


def test_the_defaults_table_mirrors_the_installed_transformers():
    import transformers

    from lmstack.checkpoint.hf_config import HF_DEFAULTS

    classes = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig,
               "mixtral": transformers.MixtralConfig}
    assert set(HF_DEFAULTS) == set(classes)
    for family, cls in classes.items():
        theirs = {f.name: f.default for f in dataclasses.fields(cls)}
        theirs["rope_theta"] = cls.default_theta
        for key, value in HF_DEFAULTS[family].items():
            assert theirs[key] == value, f"{family}.{key}: ours {value!r}, transformers {theirs[key]!r}"


# ---- layer_types: Mistral honours them (read as Ministral), Mixtral does not ----------------------

def test_mixtral_layer_types_are_ignored_as_transformers_does(tmp_path):
    hf_model("mixtral", sliding_window=6, layer_types=["full_attention", "sliding_attention"]).save_pretrained(tmp_path)
    theirs, ours = _load_both(tmp_path)
    assert [ours.config.window_for_layer(i) for i in range(2)] == [6, 6]
    assert _max_diff(theirs, ours) <= 1e-4
    assert ours.config.layer_types is None and VOCAB == ours.config.vocab_size

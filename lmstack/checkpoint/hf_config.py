"""config.json <-> ModelConfig for every supported Hugging Face architecture.

Reads both transformers v4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and v5
(`rope_parameters`, `dtype`) spellings; writes the v4 spelling, which v4, v5 and vLLM all read.
Shape fields are required (transformers would silently default them; we refuse to guess).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.config import ModelConfig
from lmstack.errors import CheckpointError, ConfigError

ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
}
FAMILY_TO_ARCH = {family: arch for arch, family in ARCHITECTURES.items()}
MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral",
               "mixtral": "mixtral"}

# Keys we derive ourselves on save; anything else unknown is kept in `extra` and written back.
_OWNED = {
    "architectures", "model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "intermediate_size", "n_inner",
    "max_position_embeddings", "n_positions", "n_ctx", "rms_norm_eps", "layer_norm_epsilon", "rope_theta",
    "rope_scaling", "rope_parameters", "hidden_act", "activation_function", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "tie_word_embeddings",
    "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "initializer_range", "bos_token_id",
    "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version", "attn_pdrop", "resid_pdrop",
    "embd_pdrop", "attention_dropout", "output_router_logits", "use_cache",
}


def _require(hf: dict, key: str, source: str) -> Any:
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{source} has no {key!r} field; it is required to build the model")
    return hf[key]


def family_of(hf: dict, source: str) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not archs and hf.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[hf["model_type"]]
    named = ", ".join(archs) or f"model_type {hf.get('model_type')!r}"
    raise CheckpointError(
        f"{source}: architecture {named} is not supported; lmstack loads "
        f"{', '.join(ARCHITECTURES)}"
    )


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a parsed config.json; errors name `source` and the field."""
    family = family_of(hf, source)
    extra = {k: v for k, v in hf.items() if k not in _OWNED}
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    common: dict[str, Any] = dict(
        family=family, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
        dtype=str(dtype).replace("torch.", ""), extra=extra,
    )
    try:
        if family == "gpt2":
            return _gpt2_from_hf(hf, source, common)
        return _llama_like_from_hf(hf, source, family, common)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def _gpt2_from_hf(hf: dict, source: str, common: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if act not in acts:
        raise CheckpointError(f"{source}: activation_function {act!r} is not supported ({', '.join(acts)})")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise CheckpointError(f"{source}: GPT-2 attention-scaling variants are not supported")
    hidden = _require(hf, "n_embd", source)
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size", source), hidden_size=hidden,
        num_layers=_require(hf, "n_layer", source), num_heads=_require(hf, "n_head", source),
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=_require(hf, "n_positions", source), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned", mlp="gelu", activation=acts[act],
        attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        **common,
    )


def _llama_like_from_hf(hf: dict, source: str, family: str, common: dict) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported for {family} (expected 'silu')")
    theta, scaling = _rope_from_hf(hf)
    layers = _require(hf, "num_hidden_layers", source)
    sliding_window, layer_types = hf.get("sliding_window"), hf.get("layer_types")
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            sliding_window, layer_types = None, None
        elif layer_types is None:
            first = hf.get("max_window_layers", layers)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    elif family == "llama":
        sliding_window, layer_types = None, None
    if layer_types is not None and "sliding_attention" not in layer_types:
        sliding_window, layer_types = None, None
    attention_bias = bool(hf.get("attention_bias", False))
    kw: dict[str, Any] = dict(
        vocab_size=_require(hf, "vocab_size", source), hidden_size=_require(hf, "hidden_size", source),
        intermediate_size=_require(hf, "intermediate_size", source), num_layers=layers,
        num_heads=_require(hf, "num_attention_heads", source),
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        attn_qkv_bias=attention_bias or family == "qwen2", attn_out_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=family == "qwen3", sliding_window=sliding_window,
        layer_types=list(layer_types) if layer_types else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if family == "mixtral":
        kw.update(mlp="moe", num_experts=_require(hf, "num_local_experts", source),
                  num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                  router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    return ModelConfig(**kw, **common)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers writes for the matching architecture."""
    hf: dict[str, Any] = {"architectures": [FAMILY_TO_ARCH[cfg.family]], "model_type": MODEL_TYPES[cfg.family]}
    if cfg.family == "gpt2":
        acts = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
        if cfg.activation not in acts:
            raise ConfigError(f"activation={cfg.activation!r} has no GPT-2 config.json spelling ({', '.join(acts)})")
        hf.update(
            vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
            layer_norm_epsilon=cfg.norm_eps, activation_function=acts[cfg.activation],
            attn_pdrop=cfg.dropout, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        )
    else:
        hf.update(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
            rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, attention_dropout=0.0,
        )
        if cfg.family in ("llama", "qwen3"):
            hf.update(attention_bias=cfg.attn_out_bias)
        if cfg.family == "llama":
            hf.update(mlp_bias=cfg.mlp_bias)
        if cfg.family in ("mistral", "mixtral"):
            hf.update(sliding_window=cfg.sliding_window)
        if cfg.family in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                      max_window_layers=_first_sliding_layer(cfg))
            if cfg.layer_types is not None:
                hf.update(layer_types=list(cfg.layer_types))
        if cfg.family == "mixtral":
            hf.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                      router_aux_loss_coef=cfg.router_aux_loss_coef)
    hf.update(
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        torch_dtype=cfg.dtype, use_cache=True,
    )
    for key, value in cfg.extra.items():
        hf.setdefault(key, value)
    return hf


# What a config.json must carry for the model to load back as the same function.
_ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "max_position_embeddings", "norm", "norm_eps", "position", "mlp", "activation", "attn_qkv_bias",
                "attn_out_bias", "mlp_bias", "qk_norm", "tie_embeddings", "num_experts", "num_experts_per_tok")


def hf_layout_problems(cfg: ModelConfig) -> list[str]:
    """What in `cfg` its family's Hugging Face config.json cannot express: saved as is, the model
    would load back as a different function. Empty when the round trip is exact.

    GPT-2 without linear biases is expressible: it is saved with zero biases (weight_map.implied_zeros)."""
    arch = FAMILY_TO_ARCH[cfg.family]
    try:
        back = config_from_hf(config_to_hf(cfg))
    except (ConfigError, CheckpointError) as err:
        return [str(err)]
    pairs = [(f, getattr(cfg, f), getattr(back, f)) for f in _ARCH_FIELDS]
    if cfg.position == "rope":
        pairs += [(f, getattr(cfg, f), getattr(back, f)) for f in ("rope_theta", "rope_scaling")]
    pairs.append(("layer_types / sliding_window", _attention_layout(cfg), _attention_layout(back)))
    problems = []
    for name, ours, theirs in pairs:
        if ours == theirs or (cfg.family == "gpt2" and name.endswith("_bias") and ours is False):
            continue
        problems.append(f"{name}={ours!r} (a {arch} config.json loads it as {theirs!r})")
    return problems


def _attention_layout(cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Per layer (kind, window): the attention every layer really does."""
    kinds = cfg.layer_types or ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_layers
    return [(k, cfg.sliding_window if k == "sliding_attention" else None) for k in kinds]


def _first_sliding_layer(cfg: ModelConfig) -> int:
    if cfg.sliding_window is None:
        return cfg.num_layers
    if cfg.layer_types is None:
        return 0
    return next((i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"), cfg.num_layers)


def read_config(directory: Path) -> ModelConfig:
    import json

    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); fix or re-save it") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(hf).__name__}")
    return config_from_hf(hf, str(path))

"""config.json <-> ModelConfig for every supported Hugging Face architecture.

Reads both transformers v4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and v5
(`rope_parameters`, `dtype`) spellings, resolving them as transformers does; writes the v4 spelling,
which v4, v5 and vLLM all read. Shape fields are required (transformers would silently default them;
we refuse to guess); an absent non-shape field (rope_theta, rms_norm_eps, sliding_window, ...) means
what it means to that architecture's transformers config class, or the same file would be another
function here than there. `read_config` also keeps the directory's generation_config.json (stop ids,
sampling defaults) on the config, apart from config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.checkpoint.weight_map import bias_stored_as_zeros
from lmstack.config import ModelConfig, check_rope_scaling, is_int, is_number
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
    "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version", "output_router_logits",
    "use_cache",
}
# The defaults of the non-shape fields a config.json may leave out. They mirror the defaults of
# transformers' config classes (the dataclass fields of GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config,
# MistralConfig, MixtralConfig in transformers 5.x; rope_theta is the class's `default_theta`), so a sparse
# config.json builds the same function here as in transformers. tests/checkpoint/test_hf_config_defaults.py checks
# the table against the installed transformers. Qwen3's head_dim is a shape field, but transformers fills
# it with 128 rather than hidden_size // num_attention_heads, so a file without it means 128.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": True},
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28, "head_dim": 128},
    "mistral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "tie_word_embeddings": False, "sliding_window": 4096},
    "mixtral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                "tie_word_embeddings": False, "sliding_window": None, "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.001},
}
# Dropout probabilities are training options, not part of the function: a config.json keeps the
# ones it came with (in `extra`) unless lmstack trained with its own `dropout`.
_GPT2_DROPOUTS = ("attn_pdrop", "resid_pdrop", "embd_pdrop")


def _dropouts(cfg: ModelConfig, keys: tuple[str, ...]) -> dict[str, float]:
    return {k: cfg.dropout if cfg.dropout else cfg.extra.get(k, 0.0) for k in keys}


def _require(hf: dict, key: str, source: str) -> Any:
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{source} has no {key!r} field; it is required to build the model")
    return hf[key]


_ABSENT = object()
_KINDS = {  # kind -> (check, what config.json must hold)
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (is_int, "an integer"),
    "count": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "number": (is_number, "a number"),
    "positive": (lambda v: is_number(v) and v > 0, "a positive number"),
}


def _field(hf: dict, key: str, source: str, kind: str, default: Any = _ABSENT, nullable: bool = False) -> Any:
    """hf[key] if it is of `kind` (JSON types strictly: "false" is not false, "2" is not 2).

    Absent: `default`, or an error when there is none. null: None when `nullable`, else an error."""
    if key not in hf or (hf[key] is None and not nullable and default is _ABSENT):
        if default is _ABSENT:
            return _require(hf, key, source)
        return default
    value = hf[key]
    if value is None and nullable:
        return None
    check, expected = _KINDS[kind]
    if not check(value):
        raise CheckpointError(f"{source}: {key} must be {expected}{' or null' if nullable else ''}, "
                              f"got {value!r}; correct that field")
    return value


def _token_ids(hf: dict, source: str, vocab_size: int | None) -> dict[str, Any]:
    """bos/eos/pad ids: integers (eos may be a list) inside [0, vocab_size) when vocab_size is given."""
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf.get(key)
        if key == "pad_token_id" and is_int(value) and value < 0:
            value = None  # some published configs write -1 for "no padding token"
        ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
        if value is not None and not all(is_int(i) for i in ids):
            kind = "an integer or a list of integers" if key == "eos_token_id" else "an integer"
            raise CheckpointError(f"{source}: {key} must be {kind} (or null), got {value!r}; correct that field")
        if value is not None and vocab_size is not None:
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise CheckpointError(
                    f"{source}: {key}={value!r} is outside the vocabulary [0, {vocab_size}) of vocab_size="
                    f"{vocab_size}; set it to the id of that token in this model's tokenizer, or null")
        out[key] = value
    return out


def family_of(hf: dict, source: str) -> str:
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f'{source}: architectures must be a list of class names like ["LlamaForCausalLM"], '
                              f"got {archs!r}; correct that field")
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not archs and isinstance(hf.get("model_type"), str) and hf["model_type"] in MODEL_TYPES:
        return MODEL_TYPES[hf["model_type"]]
    named = ", ".join(archs) or f"model_type {hf.get('model_type')!r}"
    raise CheckpointError(
        f"{source}: architecture {named} is not supported; lmstack loads "
        f"{', '.join(ARCHITECTURES)}"
    )


def _rope_from_hf(hf: dict, source: str, family: str, max_positions: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) as transformers resolves them (modeling_rope_utils.convert_rope_params_to_dict).

    A non-empty v4 `rope_scaling` replaces v5 `rope_parameters` whole (transformers: `rope_scaling or
    rope_parameters`); rope_theta comes from the chosen object, else the top-level `rope_theta`, else the
    class default; llama3 scaling without original_max_position_embeddings takes max_position_embeddings."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{source}: rope_parameters must be an object like "
                              f'{{"rope_type": "default", "rope_theta": 10000.0}} or null, got {params!r}')
    raw = hf.get("rope_scaling")
    if raw is not None and not isinstance(raw, dict):
        try:
            check_rope_scaling(raw)
        except ConfigError as err:
            raise CheckpointError(f"{source}: {err}") from None
    field, chosen = ("rope_scaling", dict(raw)) if raw else ("rope_parameters", dict(params or {}))
    nested = [k for k, v in chosen.items() if isinstance(v, dict)]
    if nested:
        raise CheckpointError(f"{source}: {field} holds per-layer-type RoPE settings ({', '.join(nested)}); a "
                              f"{FAMILY_TO_ARCH[family]} has one RoPE for every layer: give {field} one object")
    if "rope_theta" in chosen:
        theta = _field(chosen, "rope_theta", f"{source}: {field}", "positive")
    else:
        theta = _field(hf, "rope_theta", source, "positive", default=HF_DEFAULTS[family]["rope_theta"])
    scaling = {k: v for k, v in chosen.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    if scaling.get("rope_type") == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_positions)
    try:
        check_rope_scaling(scaling, field)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    return float(theta), scaling


def config_from_hf(hf: dict, source: str = "config.json", check_token_ids: bool = True) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json; errors name `source` and the field.

    Every field is type-checked as JSON (a quoted "false" is not false). With check_token_ids,
    bos/eos/pad ids must lie inside the vocabulary."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source} must hold a JSON object, got {type(hf).__name__}")
    family = family_of(hf, source)
    extra = {k: v for k, v in hf.items() if k not in _OWNED}
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    vocab = _field(hf, "vocab_size", source, "count")
    init_range = _field(hf, "initializer_range", source, "number", default=None, nullable=True)
    common: dict[str, Any] = dict(
        family=family, **_token_ids(hf, source, vocab if check_token_ids else None),
        initializer_range=0.02 if init_range is None else init_range,
        dtype=str(dtype).replace("torch.", ""), extra=extra,
    )
    try:
        if family == "gpt2":
            return _gpt2_from_hf(hf, source, common)
        return _llama_like_from_hf(hf, source, family, common)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def _gpt2_from_hf(hf: dict, source: str, common: dict) -> ModelConfig:
    defaults = HF_DEFAULTS["gpt2"]
    act = hf.get("activation_function", defaults["activation_function"])
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if not isinstance(act, str) or act not in acts:
        raise CheckpointError(f"{source}: activation_function {act!r} is not supported ({', '.join(acts)})")
    if (_field(hf, "scale_attn_by_inverse_layer_idx", source, "bool", default=False)
            or not _field(hf, "scale_attn_weights", source, "bool", default=True)):
        raise CheckpointError(f"{source}: GPT-2 attention-scaling variants are not supported")
    hidden = _field(hf, "n_embd", source, "count")
    return ModelConfig(
        vocab_size=_field(hf, "vocab_size", source, "count"), hidden_size=hidden,
        num_layers=_field(hf, "n_layer", source, "count"), num_heads=_field(hf, "n_head", source, "count"),
        intermediate_size=_field(hf, "n_inner", source, "count", default=None, nullable=True) or 4 * hidden,
        max_position_embeddings=_field(hf, "n_positions", source, "count"), norm="layernorm",
        norm_eps=_field(hf, "layer_norm_epsilon", source, "positive", default=defaults["layer_norm_epsilon"]),
        position="learned",
        mlp="gelu", activation=acts[act], attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_embeddings=_field(hf, "tie_word_embeddings", source, "bool", default=defaults["tie_word_embeddings"]),
        **common,
    )


def _llama_like_from_hf(hf: dict, source: str, family: str, common: dict) -> ModelConfig:
    defaults = HF_DEFAULTS[family]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported for {family} (expected 'silu')")
    max_positions = _field(hf, "max_position_embeddings", source, "count",
                           default=defaults["max_position_embeddings"])
    theta, scaling = _rope_from_hf(hf, source, family, max_positions)
    layers = _field(hf, "num_hidden_layers", source, "count")
    heads = _field(hf, "num_attention_heads", source, "count")
    sliding_window = _field(hf, "sliding_window", source, "count", default=defaults.get("sliding_window"),
                            nullable=True)
    layer_types = hf.get("layer_types")
    if layer_types is not None and not (isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
        raise CheckpointError(f"{source}: layer_types must be a list of \"full_attention\" / \"sliding_attention\", "
                              f"got {layer_types!r}; correct that field")
    if family in ("qwen2", "qwen3"):
        if not _field(hf, "use_sliding_window", source, "bool", default=defaults["use_sliding_window"]):
            sliding_window, layer_types = None, None
        elif layer_types is None:
            first = _field(hf, "max_window_layers", source, "int", default=defaults["max_window_layers"])
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    elif family == "llama":
        sliding_window, layer_types = None, None
    elif family == "mixtral":
        # MixtralForCausalLM applies sliding_window to every layer and ignores layer_types (transformers'
        # AutoConfig reads a Mistral config.json with layer_types as Ministral, which honours them).
        layer_types = None
    if layer_types is not None and "sliding_attention" not in layer_types:
        sliding_window, layer_types = None, None
    attention_bias = _field(hf, "attention_bias", source, "bool", default=defaults.get("attention_bias", False))
    head_dim = _field(hf, "head_dim", source, "count", default=defaults.get("head_dim"), nullable=True)
    kw: dict[str, Any] = dict(
        vocab_size=_field(hf, "vocab_size", source, "count"), hidden_size=_field(hf, "hidden_size", source, "count"),
        intermediate_size=_field(hf, "intermediate_size", source, "count"), num_layers=layers, num_heads=heads,
        num_kv_heads=_field(hf, "num_key_value_heads", source, "count", default=None, nullable=True) or heads,
        head_dim=head_dim, max_position_embeddings=max_positions,
        norm_eps=_field(hf, "rms_norm_eps", source, "positive", default=defaults["rms_norm_eps"]), rope_theta=theta,
        rope_scaling=scaling, attn_qkv_bias=attention_bias or family == "qwen2", attn_out_bias=attention_bias,
        mlp_bias=_field(hf, "mlp_bias", source, "bool", default=defaults.get("mlp_bias", False)), qk_norm=family == "qwen3",
        sliding_window=sliding_window, layer_types=list(layer_types) if layer_types else None,
        tie_embeddings=_field(hf, "tie_word_embeddings", source, "bool", default=defaults["tie_word_embeddings"]),
    )
    if family == "mixtral":
        kw.update(mlp="moe", num_experts=_field(hf, "num_local_experts", source, "count"),
                  num_experts_per_tok=_field(hf, "num_experts_per_tok", source, "count",
                                             default=defaults["num_experts_per_tok"]),
                  router_aux_loss_coef=_field(hf, "router_aux_loss_coef", source, "number",
                                              default=defaults["router_aux_loss_coef"]))
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
            **_dropouts(cfg, _GPT2_DROPOUTS),
        )
    else:
        hf.update(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
            rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, **_dropouts(cfg, ("attention_dropout",)),
        )
        if cfg.family in ("llama", "qwen3"):
            hf.update(attention_bias=cfg.attn_out_bias)
        if cfg.family == "llama":
            hf.update(mlp_bias=cfg.mlp_bias)
        if cfg.family in ("mistral", "mixtral"):
            hf.update(sliding_window=cfg.sliding_window)
        if cfg.family == "mistral" and cfg.layer_types is not None:
            # transformers' AutoConfig reads a Mistral config.json with layer_types as Ministral, whose
            # attention follows them; MixtralForCausalLM ignores layer_types, so Mixtral never writes them.
            hf.update(layer_types=list(cfg.layer_types))
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
        back = config_from_hf(config_to_hf(cfg), check_token_ids=False)
    except (ConfigError, CheckpointError) as err:
        return [str(err)]
    pairs = [(f, getattr(cfg, f), getattr(back, f)) for f in _ARCH_FIELDS]
    if cfg.position == "rope":
        pairs += [(f, getattr(cfg, f), getattr(back, f)) for f in ("rope_theta", "rope_scaling")]
    pairs.append(("layer_types / sliding_window", _attention_layout(cfg), _attention_layout(back)))
    problems = []
    for name, ours, theirs in pairs:
        if ours == theirs or bias_stored_as_zeros(cfg, name):
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


def read_config_json(directory: Path) -> dict[str, Any]:
    """config.json of a model directory, parsed and checked to be a JSON object."""
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
    return hf


def declared_dtype(hf: dict) -> str | None:
    """The weight dtype config.json names (v4 `torch_dtype`, v5 `dtype`), or None when it names none."""
    value = hf.get("torch_dtype") or hf.get("dtype")
    return str(value).replace("torch.", "") if isinstance(value, str) and value else None


def read_generation_config(directory: Path, vocab_size: int | None = None) -> dict[str, Any] | None:
    """generation_config.json of a model directory (None when there is none), checked.

    It holds what config.json does not: the full list of stop ids (Llama 3 and Qwen2.5 list several
    while config.json holds one) and the sampling defaults the model was released with. Its eos ids
    must be token ids of this model: generation stops on them and masks them by index."""
    import json

    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); fix or delete it (it names the model's stop "
                              "tokens)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object of generation settings, got {type(data).__name__}; "
                              "fix or remove it")
    eos = data.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not all(is_int(i) and i >= 0 for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}; "
                              "correct that field")
    bad = [i for i in ids if vocab_size is not None and i >= vocab_size]
    if bad:
        raise CheckpointError(f"{path}: eos_token_id={eos!r} is outside the vocabulary [0, {vocab_size}) of "
                              f"config.json; set it to the ids of this model's stop tokens")
    return data


def read_config(directory: Path) -> ModelConfig:
    """The ModelConfig of a model directory: config.json, plus generation_config.json as
    `generation_defaults` (never written into config.json)."""
    directory = Path(directory)
    config = config_from_hf(read_config_json(directory), str(directory / "config.json"))
    config.generation_defaults = read_generation_config(directory, config.vocab_size)
    return config

"""Model configuration: one `ModelConfig` dataclass for every decoder family, and named presets.

A family (gpt2, llama, qwen2, qwen3, mistral, mixtral) is a set of switches on the one
`Transformer` plus a weight-name map in `checkpoint/hf.py`; presets record the published
shapes of real models so `lmstack.load("llama-3.2-1b", random_init=True)` builds the real thing.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmstack.errors import ConfigError

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "mixtral")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu", "moe")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
ROPE_TYPES = ("default", "linear", "llama3")
# The keys each rope_type reads (model/rope.py), all positive numbers.
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
BOOL_FIELDS = ("attn_qkv_bias", "attn_out_bias", "mlp_bias", "qk_norm", "tie_embeddings")


def is_int(value: Any) -> bool:
    """An integer proper (JSON 2, not 2.0, "2" or true)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float (not a bool, not a numeric string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rope_scaling(scaling: Any, field: str = "rope_scaling") -> None:
    """Raise ConfigError unless `scaling` is a dict of a supported rope_type with the keys that type reads."""
    example = '{"rope_type": "linear", "factor": 2.0}'
    if not isinstance(scaling, dict):
        raise ConfigError(f"{field} must be an object like {example} or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(f"{field} type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    needed = ROPE_KEYS[rope_type]
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise ConfigError(f"{field} with rope_type {rope_type!r} needs the keys {', '.join(needed)}; "
                          f"missing {', '.join(missing)}")
    for key in needed:
        if not is_number(scaling[key]) or not scaling[key] > 0:
            raise ConfigError(f"{field}.{key} must be a positive number, got {scaling[key]!r}")


@dataclass
class ModelConfig:
    """Every switch of the decoder. Field names are ours; `checkpoint/hf.py` maps them to HF's."""

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None  # None: same as num_heads (MHA); 1 is MQA; between is GQA
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: 4 * hidden_size
    max_position_embeddings: int = 2048
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" | "linear", "factor": ...}
    mlp: str = "swiglu"
    activation: str = "silu"
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"
    tie_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    dropout: float = 0.0
    initializer_range: float = 0.02
    pad_vocab_to_multiple: int = 1  # >1 pads the embedding rows for speed; logits keep vocab_size
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # the dtype weights are stored in (config.json's torch_dtype)
    extra: dict[str, Any] = field(default_factory=dict)  # HF fields we keep for the round trip
    # The generation_config.json the model was loaded with (its stop ids, sampling defaults): generation
    # stops on its eos ids too, and saving writes it back to generation_config.json, never to config.json.
    generation_defaults: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and is_int(self.hidden_size) and is_int(self.num_heads):  # else validate() says
            if self.num_heads <= 0 or self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly or change one of them"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.validate()

    # ---- derived shapes -------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_to_multiple)
        return (self.vocab_size + m - 1) // m * m

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window_for_layer(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def stop_token_ids(self) -> list[int]:
        """config.json's eos ids, then the further ones of generation_config.json (generation_defaults)."""
        ids: list[int] = []
        for value in (self.eos_token_id, (self.generation_defaults or {}).get("eos_token_id")):
            for token in value if isinstance(value, (list, tuple)) else [] if value is None else [value]:
                if token not in ids:
                    ids.append(int(token))
        return ids

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count from the shapes alone (no model needed), used for MFU and presets."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attn_qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.attn_out_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        dense = (3 if self.mlp in ("swiglu", "moe") else 2) * h * i
        if self.mlp_bias:
            dense += (2 * i if self.mlp == "swiglu" else i) + h
        mlp = dense * self.num_experts + self.num_experts * h if self.mlp == "moe" else dense
        norm = h * (2 if self.norm == "layernorm" else 1)
        total = self.num_layers * (attn + mlp + 2 * norm) + norm
        embeddings = v * h + (self.max_position_embeddings * h if self.position == "learned" else 0)
        if not exclude_embeddings:
            total += embeddings
        if not self.tie_embeddings:
            total += v * h
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): PaLM's 6N plus the attention term.

        N counts the weights a token actually multiplies: no embedding lookup, the output
        head (padded vocabulary) always, and only the top-k experts of an MoE layer.
        """
        n = self.num_parameters(exclude_embeddings=True)
        if not self.tie_embeddings:
            n -= self.vocab_size * self.hidden_size
        n += self.padded_vocab_size * self.hidden_size
        if self.mlp == "moe":
            n -= self.num_layers * (self.num_experts - self.num_experts_per_tok) * 3 * self.hidden_size * (
                self.intermediate_size)
        return 6 * n + 12 * self.num_layers * self.num_heads * self.head_dim * seq_len

    # ---- checks -----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first field that is out of range or inconsistent."""
        choices = {
            "family": FAMILIES,
            "norm": NORMS,
            "position": POSITIONS,
            "mlp": MLPS,
            "activation": ACTIVATIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, low in (("norm_eps", 0.0), ("rope_theta", 0.0)):
            value = getattr(self, name)
            if not is_number(value) or not value > low:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("router_aux_loss_coef", "initializer_range"):
            if not is_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a number, got {getattr(self, name)!r}")
        for name in ("num_experts", "num_experts_per_tok"):
            if not is_int(getattr(self, name)):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not is_int(self.pad_vocab_to_multiple):
            raise ConfigError(f"pad_vocab_to_multiple must be an integer, got {self.pad_vocab_to_multiple!r}")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
            if value is not None and not all(is_int(i) for i in ids):
                kind = "an integer, a list of integers" if name == "eos_token_id" else "an integer"
                raise ConfigError(f"{name} must be {kind} or null, got {value!r}")
        if self.generation_defaults is not None and not isinstance(self.generation_defaults, dict):
            raise ConfigError(f"generation_defaults must be a dict (a generation_config.json) or None, "
                              f"got {type(self.generation_defaults).__name__}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.sliding_window is not None and (not is_int(self.sliding_window) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.layer_types is not None and not isinstance(self.layer_types, list):
            raise ConfigError(f"layer_types must be a list of 'full_attention' / 'sliding_attention', "
                              f"got {self.layer_types!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}"
                )
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise ConfigError(f"layer_types has unknown entries {sorted(bad)}")
        if self.mlp == "moe":
            if self.num_experts < 1:
                raise ConfigError("mlp='moe' needs num_experts >= 1")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                    f"num_experts={self.num_experts}"
                )
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        self._validate_family()

    def _validate_family(self) -> None:
        """A family saves under one HF architecture, so it must only use what that class has."""
        f = self.family
        if f == "gpt2":
            need = {"position": "learned", "norm": "layernorm", "mlp": "gelu"}
            if self.num_kv_heads != self.num_heads:
                raise ConfigError("family 'gpt2' has no grouped-query attention: set num_kv_heads=num_heads")
        else:
            need = {"position": "rope", "norm": "rmsnorm"}
            need["mlp"] = "moe" if f == "mixtral" else "swiglu"
        for name, value in need.items():
            if getattr(self, name) != value:
                raise ConfigError(
                    f"family {f!r} needs {name}={value!r}, got {getattr(self, name)!r}; "
                    f"choose the family whose architecture matches"
                )
        if self.qk_norm and f != "qwen3":
            raise ConfigError(f"qk_norm is only in family 'qwen3', not {f!r}")
        if f == "qwen3" and not self.qk_norm:
            raise ConfigError("family 'qwen3' always has qk_norm=True")

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(copy.deepcopy(self), **changes)


# ---- presets -------------------------------------------------------------------------------

def _gpt2(hidden: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        family="gpt2", vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=heads,
        max_position_embeddings=1024, norm="layernorm", norm_eps=1e-5, position="learned", mlp="gelu",
        activation="gelu_tanh", attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
        bos_token_id=50256, eos_token_id=50256,
    )


def _llama32(hidden: int, inter: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        family="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_embeddings=True, bos_token_id=128000, eos_token_id=128001, dtype="bfloat16",
    )


def _qwen(family: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int,
          head_dim: int | None, tied: bool, max_pos: int) -> ModelConfig:
    return ModelConfig(
        family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, max_position_embeddings=max_pos,
        norm_eps=1e-6, rope_theta=1000000.0, attn_qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        tie_embeddings=tied, bos_token_id=151643, eos_token_id=151645 if family == "qwen3" else 151643,
        dtype="bfloat16",
    )


def _tiny(family: str, **changes: Any) -> ModelConfig:
    """Small enough for CPU tests in milliseconds, with every switch of its family on."""
    base = dict(
        family=family, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=256, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    )
    base.update(changes)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "llama-3.2-1b": _llama32(2048, 8192, 16, 32),
    "llama-3.2-3b": _llama32(3072, 8192, 28, 24),
    "llama-3.1-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001, dtype="bfloat16",
    ),
    "qwen2.5-0.5b": _qwen("qwen2", 151936, 896, 4864, 24, 14, 2, None, True, 32768),
    "qwen2.5-7b": _qwen("qwen2", 152064, 3584, 18944, 28, 28, 4, None, False, 32768),
    "qwen3-0.6b": _qwen("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, True, 40960),
    "qwen3-8b": _qwen("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, False, 40960),
    "mistral-7b": ModelConfig(
        family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, max_position_embeddings=32768, sliding_window=4096,
        bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    ),
    "mixtral-8x7b": ModelConfig(
        family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, max_position_embeddings=32768, rope_theta=1000000.0, mlp="moe",
        num_experts=8, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    ),
    # Tiny presets for tests and laptops: every switch of the family, a few thousand parameters.
    "tiny-gpt2": _tiny("gpt2", num_kv_heads=4, norm="layernorm", position="learned", mlp="gelu",
                       activation="gelu_tanh", attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                       tie_embeddings=True),
    "tiny-llama": _tiny("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "tiny-qwen2": _tiny("qwen2", attn_qkv_bias=True, tie_embeddings=True, norm_eps=1e-6),
    "tiny-qwen3": _tiny("qwen3", qk_norm=True, head_dim=32, norm_eps=1e-6),
    "tiny-mistral": _tiny("mistral", sliding_window=8),
    "tiny-mixtral": _tiny("mixtral", mlp="moe", num_experts=4, num_experts_per_tok=2),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (callers may change it freely)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])

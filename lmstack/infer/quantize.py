"""Weight-only quantization through torchao: int8 (per channel), int4 (group-wise), float8.

`quantize(model, "int8" | "int4" | "float8")` swaps every Linear weight (attention, MLP,
experts, and the LM head unless told not to) for a torchao quantized tensor; the matmuls then
run torchao's kernels (tinygemm int4 on CUDA, int8 weight-only, float8 on SM >= 8.9).
int4 on CPU uses torchao's portable `IntxWeightOnlyConfig` (int4 values stored one per int8,
correct but not faster); the packed CUDA int4 layout needs bfloat16 and a CUDA device.

On disk (`save_quantized`, `lmstack quantize`): an HF-style directory whose config.json has
`"quantization_config": {"quant_method": "torchao", "lmstack": {...}}` and whose
model.safetensors holds torchao's flattened tensors (its safetensors metadata format) under
lmstack's *own* parameter names (fused qkv / gate_up). `lmstack.load` reads it back;
transformers cannot (its torchao loader expects its unfused module names).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmstack.errors import CheckpointError, ConfigError

METHODS = ("int8", "int4", "float8")
WEIGHTS = "model.safetensors"


def _torchao():
    # torchao's import logs a warning per optional kernel library this build lacks (mxfp8, the
    # sm90a CUTLASS kernels on a CPU wheel) and torch a deprecation per Enum it registers: noise
    # on every quantize / load, none of it about what lmstack uses. Quiet only during the import.
    import logging

    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except ImportError:
        raise ConfigError("quantization needs torchao: pip install torchao (see docs/inference.md for versions)") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return quantize_


def quant_config(method: str, group_size: int, device: torch.device):
    """The torchao config for a method on a device (validated here)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if method == "int8":
        return Int8WeightOnlyConfig()
    if method == "int4":
        if device.type == "cuda":
            return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    if method == "float8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ConfigError("float8 weights need a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer); "
                              "use int8 or int4 here")
        return Float8WeightOnlyConfig()
    raise ConfigError(f"quantization method {method!r} is not one of {', '.join(METHODS)}")


def _targets(model: nn.Module, include_lm_head: bool, group_size: int, method: str):
    """Which Linear layers get quantized: all but the MoE router (tiny, and routing is sensitive)."""
    def want(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or fqn.endswith("router"):
            return False
        if fqn == "lm_head" and not include_lm_head:
            return False
        return method != "int4" or module.in_features % group_size == 0
    return want


def quantize(model, method: str = "int8", group_size: int = 128, include_lm_head: bool = True):
    """Quantize a Transformer's Linear weights in place (and return it).

    A tied LM head gets its own quantized copy; the embedding keeps full precision (a lookup
    reads one row, so it costs no bandwidth). int4 on CUDA casts the model to bfloat16 first.
    Layers whose input size is not a multiple of group_size stay unquantized (int4); their
    names are recorded in quantization_config.lmstack.kept, and if no layer fits, it is an error.
    """
    refuse_quantized_model(model, "quantize")  # torchao cannot quantize its own tensors again
    if method not in METHODS:  # before importing torchao, whose import warns at length
        raise ConfigError(f"quantization method {method!r} is not one of {', '.join(METHODS)}")
    quantize_ = _torchao()
    if method == "int4" and group_size not in (32, 64, 128, 256):
        raise ConfigError(f"group_size={group_size} must be one of 32, 64, 128, 256 for int4")
    candidates = _targets(model, include_lm_head, 1, "int8")  # every layer a group size allows
    wanted = _targets(model, include_lm_head, group_size, method)
    names = [fqn for fqn, m in model.named_modules() if candidates(m, fqn)]
    kept = [fqn for fqn, m in model.named_modules() if candidates(m, fqn) and not wanted(m, fqn)]
    if names and len(kept) == len(names):
        sizes = sorted({m.in_features for fqn, m in model.named_modules() if candidates(m, fqn)})
        raise ConfigError(f"group_size={group_size} divides none of this model's layer input sizes {sizes}, so int4 "
                          "would quantize nothing; use a group_size that divides them (32, 64, 128 or 256)")
    device = model.device
    config = quant_config(method, group_size, device)
    if method == "int4" and device.type == "cuda" and model.dtype != torch.bfloat16:
        model.to(torch.bfloat16)
    if model.config.tie_embeddings and include_lm_head:
        model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone(), requires_grad=False)
    quantize_(model, config, filter_fn=_targets(model, include_lm_head, group_size, method))
    model.config.extra["quantization_config"] = {
        "quant_method": "torchao",
        "lmstack": {"method": method, "group_size": group_size, "include_lm_head": include_lm_head,
                    "device": device.type, "layout": "lmstack-fused", "kept": kept,
                    # the embedding and head keep their padded rows, which config.json's vocab_size omits
                    "pad_vocab_to_multiple": model.config.pad_vocab_to_multiple},
    }
    return model


def quantized_method(model) -> str | None:
    q = model.config.extra.get("quantization_config") or {}
    return (q.get("lmstack") or {}).get("method")


def save_quantized(model, directory: str | Path, tokenizer=None) -> Path:
    """Write config.json (+ quantization_config), torchao-flattened safetensors, generation config, tokenizer."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    from lmstack.checkpoint.files import atomic_write_bytes
    from lmstack.checkpoint.hf import generation_config_for
    from lmstack.checkpoint.hf_config import config_to_hf

    if quantized_method(model) is None:
        raise ConfigError("the model is not quantized: call quantize(model, method) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.lm_head.weight is model.embed.weight:
        state.pop("lm_head.weight")  # tied and not quantized: stored once, as the embedding
    state = {k: v.to("cpu") if type(v) is torch.Tensor else v for k, v in state.items()}
    tensors, metadata = flatten_tensor_state_dict(state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS), metadata=metadata)
    hf = config_to_hf(model.config)
    atomic_write_bytes(directory / "config.json", (json.dumps(hf, indent=2) + "\n").encode())
    gen = generation_config_for(model.config)  # keeps the stop ids of the model's generation_config.json
    atomic_write_bytes(directory / "generation_config.json", (json.dumps(gen, indent=2) + "\n").encode())
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def _read_quantization_config(directory: str | Path) -> dict | None:
    """config.json's quantization_config (a dict), or None when there is none or no readable config.json."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # read_config names the file and the fault
    q = hf.get("quantization_config") if isinstance(hf, dict) else None
    return q if isinstance(q, dict) and q else None


def is_quantized_dir(directory: str | Path) -> bool:
    """Whether `directory` was written by `lmstack quantize` (save_quantized)."""
    q = _read_quantization_config(directory) or {}
    return q.get("quant_method") == "torchao" and "lmstack" in q


def _quantized_message(where: str | Path, method: str, what: str) -> str:
    return (f"{where} holds {method}-quantized weights (written by lmstack quantize); {what} needs the unquantized "
            "model: pass the original directory (lmstack.load, generate, chat and serve read quantized directories)")


def refuse_quantized(directory: str | Path, what: str) -> None:
    """CheckpointError when `directory` holds quantized weights, which `what` cannot use.

    A directory of `lmstack quantize` names its method; one quantized by another tool (bitsandbytes,
    GPTQ, AWQ, fp8, transformers' torchao) is refused too: its tensors are not plain weights."""
    q = _read_quantization_config(directory)
    if q is None:
        return
    if is_quantized_dir(directory):
        info = q["lmstack"] if isinstance(q["lmstack"], dict) else {}
        raise CheckpointError(_quantized_message(directory, info.get("method", "torchao"), what))
    method = q.get("quant_method", "an unknown method")
    raise CheckpointError(
        f"{directory} holds weights quantized with {method!r} (config.json quantization_config); lmstack loads "
        "unquantized safetensors or directories written by `lmstack quantize`: use the unquantized model")


def refuse_quantized_model(model, what: str) -> None:
    """CheckpointError when `model` was quantized by `quantize` (e.g. loaded from an `lmstack quantize` directory)."""
    method = quantized_method(model)
    if method is not None:
        where = getattr(model, "quantized_from", None) or "the model"
        raise CheckpointError(_quantized_message(where, method, what))


def load_quantized(directory: str | Path, device: torch.device | str = "cpu"):
    """A quantized Transformer from a directory written by `save_quantized`."""
    from safetensors import safe_open

    from lmstack.checkpoint.hf_config import read_config
    from lmstack.config import is_int
    from lmstack.model.transformer import Transformer

    _torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    directory = Path(directory)
    config = read_config(directory)
    info = config.extra["quantization_config"]["lmstack"]
    if not isinstance(info, dict) or info.get("method") not in METHODS:
        raise CheckpointError(f"{directory / 'config.json'}: quantization_config.lmstack must record the method "
                              f"({', '.join(METHODS)}), got {info!r}; quantize the original model again")
    pad = info.get("pad_vocab_to_multiple", 1)
    if not is_int(pad) or pad < 1:
        raise CheckpointError(f"{directory / 'config.json'}: quantization_config.lmstack.pad_vocab_to_multiple must be "
                              f"a positive integer, got {pad!r}; quantize the original model again")
    config.pad_vocab_to_multiple = pad
    device = torch.device(device)
    if info["method"] == "int4" and info.get("device") == "cuda" and device.type != "cuda":
        raise CheckpointError(f"{directory} holds CUDA-packed int4 weights (tinygemm layout); load it with "
                              "device='cuda', or quantize again on this device")
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise CheckpointError(f"unexpected tensors in {path}: {sorted(leftover)[:3]}")
    with torch.device("meta"):
        model = Transformer(config)
    tied = "lm_head.weight" not in state
    if tied:
        state["lm_head.weight"] = state["embed.weight"]
    else:
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight), requires_grad=False)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    model.reset_buffers()
    model.quantized_from = directory  # named when something needs the unquantized model (refuse_quantized_model)
    return model.to(device).eval()

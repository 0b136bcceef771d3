"""Load and save Hugging Face model directories: lmstack's only weight format.

Loading builds the model on the meta device and assigns the checkpoint's tensors (no random
init, no copy of the model in memory twice), in the dtype config.json names (as transformers'
dtype="auto" does) or a requested one. Every tensor the architecture needs must be present, be
floating point, and every tensor present must be used: a mismatch is an error naming the tensor
and the file, never a silently random or rounded weight. The directory's generation_config.json
travels on `config.generation_defaults` and is written back on save, so stop ids survive.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmstack.checkpoint.files import WeightFiles, atomic_write_bytes, write_shards
from lmstack.checkpoint.hf_config import (
    FAMILY_TO_ARCH,
    config_to_hf,
    declared_dtype,
    hf_layout_problems,
    read_config,
    read_config_json,
    read_generation_config,
)
from lmstack.checkpoint.weight_map import IGNORED, implied_zeros, strip_prefix_aliases, weight_rules
from lmstack.config import ModelConfig
from lmstack.errors import CheckpointError, ConfigError
from lmstack.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise ConfigError(f"dtype {dtype} is not a floating-point type; use one of {', '.join(DTYPES)} or 'auto'")
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", ""):
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def load_hf_model(directory: str | Path, dtype: torch.dtype | str | None = None,
                  device: torch.device | str = "cpu", config: ModelConfig | None = None) -> Transformer:
    """A Transformer with the weights of an HF directory; `config` may override e.g. vocab padding."""
    from lmstack.infer.quantize import refuse_quantized

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    refuse_quantized(directory, "loading it as a Hugging Face checkpoint (lmstack convert, training --model, "
                                "Transformer.from_pretrained)")
    if config is None:
        config = read_config(directory)
    elif config.generation_defaults is None:  # a given config (e.g. vocab padding) keeps the stop ids too
        shipped = read_generation_config(directory, config.vocab_size)
        if shipped is not None:
            config = config.replace(generation_defaults=shipped)
    files = WeightFiles(directory)
    dtype = resolve_dtype(dtype) or _checkpoint_dtype(directory, files)
    state = _read_state(config, files, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    for name, param in model.named_parameters():  # every shape, not only the ones _read_state knows
        if name in state and tuple(state[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{directory}: the checkpoint's weights for {name} have shape {tuple(state[name].shape)}, but "
                f"config.json implies {tuple(param.shape)}; the weights do not match config.json")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.reset_buffers()
    model.config.dtype = dtype_name(dtype)
    return model.to(device)


def _checkpoint_dtype(directory: Path, files: WeightFiles) -> torch.dtype:
    """config.json's torch_dtype/dtype when it names one we load in; else the floating dtype most of the
    weights are stored in. float64 only when asked for: a stray double tensor must not double the model."""
    declared = declared_dtype(read_config_json(directory)) if (directory / "config.json").is_file() else None
    if declared in DTYPES:
        return DTYPES[declared]
    stored = files.floating_dtype()
    return torch.float32 if stored is None or stored == torch.float64 else stored


def _read_state(config: ModelConfig, files: WeightFiles, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rules = weight_rules(config)
    present = files.names()
    alias = strip_prefix_aliases(present, rules)
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        parts = []
        for name in rule.theirs:
            if name not in alias:
                raise CheckpointError(
                    f"tensor {name!r} is missing from {files.directory} (needed for {rule.ours} of this "
                    f"{config.family} model); the weights do not match config.json"
                )
            used.add(alias[name])
            part = files.get(alias[name])
            if not part.is_floating_point():  # an integer weight would be cast silently, not loaded
                raise CheckpointError(
                    f"tensor {alias[name]!r} in {files.file_of[alias[name]]} is stored as {part.dtype}, but "
                    f"{rule.ours} is a floating-point weight; the file is quantized or corrupt: re-save it in "
                    "float32, float16 or bfloat16")
            parts.append(part)
        tensor = rule.combine(parts).to(dtype)
        expected = _expected_shape(config, rule.ours)  # the embedding rows are config.vocab_size, before padding
        if expected is not None and tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"tensor {', '.join(rule.theirs)} in {files.file_of[alias[rule.theirs[0]]]} has shape "
                f"{tuple(tensor.shape)}, but config.json implies {expected} for {rule.ours}; the weights do not "
                "belong to this config.json"
            )
        state[rule.ours] = _pad_rows(tensor, config) if rule.ours in ("embed.weight", "lm_head.weight") else tensor
    for name in implied_zeros(config):
        found = name if name in present else name.removeprefix("transformer.")
        if found not in present:
            continue
        used.add(found)
        if files.get(found).count_nonzero():
            raise CheckpointError(
                f"tensor {found!r} in {files.file_of[found]} is not zero, but this {config.family} model is "
                "configured without that bias; load the directory with its own config.json to keep it"
            )
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
        if "lm_head.weight" in present:
            used.add("lm_head.weight")  # tied checkpoints sometimes store the head too; it is the embedding
    unexpected = sorted(n for n in present - used if not IGNORED.search(n))
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]!r} in {files.file_of[unexpected[0]]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f"; it has no place in a {config.family} model with this config.json"
        )
    return state


def _pad_rows(tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    extra = config.padded_vocab_size - tensor.shape[0]
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(extra, tensor.shape[1])])


def _expected_shape(config: ModelConfig, name: str) -> tuple[int, ...] | None:
    c = config
    shapes = {
        "embed.weight": (c.vocab_size, c.hidden_size),
        "lm_head.weight": (c.vocab_size, c.hidden_size),
        "pos_embed.weight": (c.max_position_embeddings, c.hidden_size),
    }
    if name in shapes:
        return shapes[name]
    if name.endswith("attn.qkv.weight"):
        return (c.q_size + 2 * c.kv_size, c.hidden_size)
    if name.endswith("attn.out.weight"):
        return (c.hidden_size, c.q_size)
    return None


def _id_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def merge_generation_config(shipped: dict, ours: dict) -> dict:
    """A generation_config.json from a shipped one and the model config's token ids.

    The model config's bos/pad ids win, but eos ids are merged, not replaced: a model's
    generation_config.json often lists several stop ids (Llama 3: [128001, 128008, 128009])
    while config.json holds one, and transformers stops on any of the listed ones. Replacing
    the list by the scalar would make generation run past the other stop tokens.
    """
    merged = {**shipped, **ours}
    if "eos_token_id" in shipped and "eos_token_id" in ours:
        ids = _id_list(shipped["eos_token_id"])
        ids += [i for i in _id_list(ours["eos_token_id"]) if i not in ids]
        merged["eos_token_id"] = ids[0] if len(ids) == 1 and not isinstance(shipped["eos_token_id"], list) else ids
    return merged


def generation_config_for(config: ModelConfig, defaults: dict | None = None) -> dict:
    """The generation_config.json to write: the config's token ids merged into `defaults`, else into
    the generation_config.json the model was loaded with (so its extra stop ids survive a save)."""
    generation = {k: v for k, v in (("bos_token_id", config.bos_token_id), ("eos_token_id", config.eos_token_id),
                                     ("pad_token_id", config.pad_token_id)) if v is not None}
    defaults = defaults if defaults is not None else config.generation_defaults
    return merge_generation_config(defaults, generation) if defaults is not None else generation


def save_hf(model: Transformer, directory: str | Path, tokenizer=None, max_shard_size: int | str = "5GB",
            dtype: torch.dtype | str | None = None, generation_defaults: dict | None = None) -> Path:
    """Write config.json, generation_config.json, weights (sharded above max_shard_size) and the tokenizer.

    generation_defaults: a source model's generation_config.json (stop ids, sampling defaults),
    merged with the model config's token ids; by default the one the model was loaded with
    (`config.generation_defaults`), else the one already in `directory` is kept so.
    """
    from lmstack.infer.quantize import refuse_quantized_model

    if not str(directory):
        raise CheckpointError("give a directory to save the model to (got an empty path)")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save to {directory}: it is a file; give a directory")
    if tokenizer is not None and not hasattr(tokenizer, "save"):
        raise CheckpointError(f"tokenizer must be an lmstack Tokenizer (or None), got {type(tokenizer).__name__}")
    refuse_quantized_model(model, f"saving a Hugging Face checkpoint to {directory} (lmstack convert, save_pretrained)")
    config = model.config
    problems = hf_layout_problems(config)
    if problems:
        raise CheckpointError(f"cannot save to {directory}: a {FAMILY_TO_ARCH[config.family]} checkpoint cannot hold "
                              f"this {config.family} model's {'; '.join(problems)}")
    rules = weight_rules(config)
    unsaved = sorted(set(dict(model.named_parameters())) - {r.ours for r in rules})
    if unsaved:  # a parameter the layout has no place for would be silently lost
        raise CheckpointError(f"cannot save to {directory}: parameter {unsaved[0]!r} has no place in a "
                              f"{FAMILY_TO_ARCH[config.family]} checkpoint")
    directory.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype) or model.dtype
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors: dict[str, torch.Tensor] = {}
    for rule in rules:
        value = params[rule.ours].detach()
        if rule.ours in ("embed.weight", "lm_head.weight"):
            value = value[: config.vocab_size]
        for name, part in zip(rule.theirs, rule.split(value)):
            tensors[name] = part.to(device="cpu", dtype=dtype).contiguous().clone()
    for name, weight in implied_zeros(config).items():
        tensors[name] = torch.zeros(params[weight].shape[0], dtype=dtype)
    write_shards(tensors, directory, max_shard_size)
    hf_config = config_to_hf(config.replace(dtype=dtype_name(dtype)))
    atomic_write_bytes(directory / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode())
    existing = directory / "generation_config.json"
    generation = generation_config_for(config, generation_defaults)
    if generation_defaults is None and config.generation_defaults is None and existing.is_file():
        # keep sampling defaults a model shipped with
        try:
            shipped = json.loads(existing.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            shipped = None
        if isinstance(shipped, dict):
            generation = merge_generation_config(shipped, generation)
    atomic_write_bytes(existing, (json.dumps(generation, indent=2) + "\n").encode())
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory

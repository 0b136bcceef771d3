"""Turn a training config into a model: preset or HF directory, overrides, vocab padding, precision.

Kept apart from the loop so every check on the model (unknown override, vocabulary smaller than
the data's, a context the batches do not fit) happens before any weight is allocated. Weights
train in float32 (autocast gives bf16/fp16 speed), so AdamW updates are never lost to rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmstack.checkpoint.hf_config import hf_layout_problems
from lmstack.config import PRESETS, ModelConfig, get_preset, is_int
from lmstack.errors import CheckpointError, ConfigError, DataError
from lmstack.model.transformer import Transformer
from lmstack.train.config import TrainConfig


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on GPUs with bf16, fp16 (with a gradient scaler) on older GPUs, fp32 on CPU."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision='bf16' but this GPU has no bf16; use --precision fp16 or auto")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def load_tokenizer(config: TrainConfig, train_data=None):
    """--tokenizer, else the one the data was prepared with, else the model directory's (None if none)."""
    from lmstack.tokenizer import Tokenizer

    if config.tokenizer is not None:
        return Tokenizer.load(config.tokenizer)
    candidates = [getattr(train_data, "tokenizer_dir", None), config.model]
    if config.task == "pretrain":
        candidates.insert(1, config.data)
    for candidate in candidates:
        if candidate and Path(candidate).is_dir() and (Path(candidate) / "tokenizer.json").is_file():
            return Tokenizer.load(candidate)
    return None


def check_out_dir(out_dir: Path) -> None:
    """out_dir (and its checkpoints/) can be created and written, or a ConfigError says why; nothing
    is created here, so a run refused for another reason leaves no directory behind."""
    import os

    for path in (out_dir, out_dir / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out_dir {out_dir}: {path} is a file; give a directory for the run")
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out_dir {out_dir} is inside {existing}, which is a file; give a directory for the run")
    writable = [p for p in (existing, out_dir / "checkpoints") if p.is_dir()]
    if not all(os.access(p, os.W_OK | os.X_OK) for p in writable):
        raise ConfigError(f"--out_dir {out_dir} cannot be written ({existing} is read-only for this user); "
                          "choose a writable directory")


def check_tokenizers(config: TrainConfig, tokenizer, train_data, val_data) -> None:
    """The tokenizer, the data, the validation data and a model directory's own tokenizer must be
    one tokenizer: ids from another would silently mean other text (and the exported model would
    ship a tokenizer that does not match its weights). Compared by fingerprint (sha256 of tokenizer.json)."""
    from lmstack.tokenizer import Tokenizer

    named: list[tuple[str, str]] = []
    if config.tokenizer is not None and tokenizer is not None:
        named.append((f"--tokenizer {config.tokenizer}", tokenizer.fingerprint))
    if Path(config.model).is_dir() and (Path(config.model) / "tokenizer.json").is_file():
        named.append((f"the model's tokenizer ({config.model})", Tokenizer.load(config.model).fingerprint))
    for option, path, data in (("--data", config.data, train_data), ("--val_data", config.val_data, val_data)):
        index = getattr(data, "index", None)
        if isinstance(index, dict) and "tokenizer" in index:
            named.append((f"{option} {path or ''}".strip() + " (prepared with it)", index["tokenizer"]["fingerprint"]))
    for (first, fp_a), (other, fp_b) in zip(named, named[1:]):
        if fp_a != fp_b:
            raise DataError(f"{first} and {other} are different tokenizers (fingerprints {fp_a[:12]} vs "
                            f"{fp_b[:12]}): the same ids would mean other text. Prepare the data with the model's "
                            "tokenizer: lmstack data prepare --tokenizer MODEL_DIR ...")


def apply_overrides(base: ModelConfig, overrides: dict[str, Any], given: dict[str, Any] | None = None) -> ModelConfig:
    """`base` with some fields changed; head_dim and intermediate_size follow a new width unless given.

    given: the overrides the user wrote (errors name those, not the ids and dtype filled in for them)."""
    for key in ("hidden_size", "num_heads"):  # the arithmetic below needs them before ModelConfig checks them
        value = overrides.get(key, 1)
        if not is_int(value) or value <= 0:
            raise ConfigError(f"model_overrides {key} must be a positive integer, got {value!r}; e.g. "
                              f"{{{key}: {getattr(base, key)}}} (YAML: no quotes)")
    data = base.to_dict()
    if ("hidden_size" in overrides or "num_heads" in overrides) and "head_dim" not in overrides:
        data["head_dim"] = None
    if "hidden_size" in overrides and "intermediate_size" not in overrides:
        ratio = base.intermediate_size / base.hidden_size
        data["intermediate_size"] = int(round(ratio * overrides["hidden_size"]))
    if "num_heads" in overrides and "num_kv_heads" not in overrides:
        group = base.num_heads // base.num_kv_heads
        data["num_kv_heads"] = overrides["num_heads"] // group if overrides["num_heads"] % group == 0 else None
    if "num_layers" in overrides and base.layer_types is not None and "layer_types" not in overrides:
        data["layer_types"] = None
    data.update(overrides)
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"model_overrides {overrides if given is None else given}: {err}") from None


def _check_no_model_options(config: TrainConfig) -> None:
    """A model passed in trains as built: options that shape a model would be silently ignored."""
    given = {"dropout": config.dropout is not None, "model_overrides": bool(config.model_overrides),
             "pad_vocab_to_multiple": config.pad_vocab_to_multiple != TrainConfig.pad_vocab_to_multiple}
    for name, is_set in given.items():
        if is_set:
            raise ConfigError(f"{name}={getattr(config, name)!r} has no effect on a model passed as "
                              f"Trainer(model=...), which trains as built; leave {name} unset and set it in the "
                              "model's ModelConfig instead")


def check_model_source(config: TrainConfig) -> None:
    """--model names a model directory or a preset (checked first: every later message assumes it does)."""
    path = Path(config.model)
    if path.is_dir() or config.model in PRESETS:
        return
    what = f"{path} is a file, not a model directory" if path.exists() else f"{path} does not exist"
    raise CheckpointError(f"--model {config.model!r} is neither a model directory nor a preset ({what}); "
                          f"presets: {', '.join(sorted(PRESETS))}")


def model_config_for(config: TrainConfig, model: Transformer | None, data_vocab: int | None,
                     tokenizer) -> ModelConfig:
    """The ModelConfig this run trains, from a given model, an HF directory or a preset."""
    if model is not None:
        _check_no_model_options(config)
        cfg = model.config
    elif Path(config.model).is_dir():
        from lmstack.checkpoint.hf_config import read_config

        cfg = apply_overrides(read_config(Path(config.model)), config.model_overrides)
    elif config.model in PRESETS:
        overrides = dict(config.model_overrides)
        if data_vocab is not None:
            overrides.setdefault("vocab_size", int(data_vocab))
        if tokenizer is not None:
            for role in ("bos", "eos", "pad"):
                token_id = getattr(tokenizer, f"{role}_token_id")
                if token_id is not None:
                    overrides.setdefault(f"{role}_token_id", token_id)
        overrides.setdefault("dtype", "float32")
        cfg = apply_overrides(get_preset(config.model), overrides, given=config.model_overrides)
    else:
        check_model_source(config)
    changes: dict[str, Any] = {"pad_vocab_to_multiple": config.pad_vocab_to_multiple}
    if config.dropout is not None:
        changes["dropout"] = config.dropout
    if model is None:
        cfg = cfg.replace(**changes)
    problems = hf_layout_problems(cfg)
    if problems:  # found now, not when the first checkpoint is written hours later
        raise ConfigError(f"model {config.model} with model_overrides {config.model_overrides} could not be saved as a "
                          f"Hugging Face checkpoint: {'; '.join(problems)}; drop those overrides or choose the "
                          "family whose architecture has them")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but model {config.model} has vocab_size="
                        f"{cfg.vocab_size}; use the model's own tokenizer (or a preset, whose vocabulary follows "
                        "the data)")
    if data_vocab is not None and data_vocab > cfg.vocab_size:
        raise DataError(
            f"the data uses a vocabulary of {data_vocab} tokens but model {config.model} has vocab_size="
            f"{cfg.vocab_size}; tokenize the data with the model's tokenizer"
        )
    return cfg


def build_model(config: TrainConfig, model_config: ModelConfig, model: Transformer | None,
                resume_from: Path | None, device: torch.device) -> Transformer:
    """Float32 weights on `device`: from a checkpoint to resume, a given model, an HF directory or fresh."""
    from lmstack.checkpoint.hf import load_hf_model

    if resume_from is not None:
        built = load_hf_model(resume_from, dtype=torch.float32, device=device, config=model_config)
    elif model is not None:
        built = model.to(device=device, dtype=torch.float32)
    elif Path(config.model).is_dir():
        built = load_hf_model(config.model, dtype=torch.float32, device=device, config=model_config)
    else:
        with torch.device(device):
            built = Transformer(model_config)
        _zero_padding_rows(built)
    built.config.dtype = "float32"
    return built


@torch.no_grad()
def _zero_padding_rows(model: Transformer) -> None:
    """Padded vocabulary rows start at zero, as after loading: outputs ignore them, resume sees the same."""
    vocab = model.config.vocab_size
    model.embed.weight[vocab:].zero_()
    model.lm_head.weight[vocab:].zero_()


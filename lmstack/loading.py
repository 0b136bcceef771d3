"""`lmstack.load`: one call from a directory or a preset name to a model and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from lmstack.config import PRESETS, ModelConfig, get_preset
from lmstack.errors import CheckpointError, ConfigError
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer


def load(path_or_preset: str | Path, *, random_init: bool = False, dtype: torch.dtype | str | None = None,
         device: torch.device | str = "cpu", config: ModelConfig | None = None, seed: int | None = None,
         ) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer) from a Hugging Face directory or, with random_init=True, a preset name.

    A preset has no tokenizer, so its tokenizer is None. `dtype` defaults to the checkpoint's
    (a preset's own dtype is used only when asked for by name: random init is float32).
    """
    from lmstack.checkpoint.hf import load_hf_model, resolve_dtype
    from lmstack.train.distributed import resolve_device

    if not isinstance(path_or_preset, (str, Path)) or not str(path_or_preset):
        raise CheckpointError(f"give a model directory or a preset name, got {path_or_preset!r}")
    if config is not None and not isinstance(config, ModelConfig):
        raise ConfigError(f"config must be a ModelConfig, got {type(config).__name__}; e.g. "
                          "lmstack.get_preset('tiny-llama').replace(...) or ModelConfig.from_dict(your_dict)")
    device = resolve_device(str(device))  # a device this machine has, checked before any work
    resolve_dtype(dtype)
    path = Path(path_or_preset)
    if path.is_dir():
        from lmstack.infer.quantize import is_quantized_dir

        if is_quantized_dir(path) and not random_init:  # written by `lmstack quantize` (torchao tensors)
            from lmstack.infer.quantize import load_quantized

            model = load_quantized(path, device=device)
            return model, _matching_tokenizer(path, model, config is None)
        if random_init:
            from lmstack.checkpoint.hf_config import read_config

            model = _random_model(config or read_config(path), dtype, device, seed)
        else:
            model = load_hf_model(path, dtype=dtype, device=device, config=config)
        return model, _matching_tokenizer(path, model, config is None)
    name = str(path_or_preset)
    if name in PRESETS:
        if not random_init:
            raise CheckpointError(
                f"{name!r} is a preset (shapes only, no weights): pass random_init=True (--random-init on the "
                "command line) for fresh weights, or give the path of a Hugging Face directory"
            )
        return _random_model(config or get_preset(name), dtype, device, seed), None
    raise CheckpointError(
        f"{name!r} is neither a model directory nor a preset; presets: {', '.join(sorted(PRESETS))}"
    )


def _matching_tokenizer(path: Path, model: Transformer, from_config_json: bool) -> Tokenizer | None:
    """The directory's tokenizer, refused when it has ids the model has no embedding row for.

    Fewer tokens than vocab_size is normal (models pad their vocabulary); more means another model's tokenizer."""
    if not (path / "tokenizer.json").is_file():
        return None
    tokenizer = Tokenizer.load(path)
    vocab = model.config.vocab_size
    size = tokenizer.id_space
    if size > vocab:
        where = "config.json vocab_size" if from_config_json else "the model's vocab_size"
        raise CheckpointError(
            f"{path}: tokenizer.json has {size} tokens but {where}={vocab}; the tokenizer does not belong to "
            "this model: put the model's own tokenizer files in the directory"
        )
    return tokenizer


def _random_model(config: ModelConfig, dtype, device, seed: int | None) -> Transformer:
    from lmstack.checkpoint.hf import dtype_name, resolve_dtype

    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config)
    dtype = resolve_dtype(dtype)
    if dtype is not None:
        model = model.to(dtype)
    model.config.dtype = dtype_name(model.dtype)
    return model

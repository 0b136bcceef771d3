"""`lmstack convert`: Hugging Face directory (or preset) -> Hugging Face directory.

Since lmstack's format *is* the HF format, converting means: normalise a checkpoint of a
supported family, change its dtype, reshard it, or materialise a preset with fresh weights.
"""

from __future__ import annotations


def convert(
    source: str,
    out: str,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    random_init: bool = False,
    seed: int = 0,
) -> None:
    """Write a Hugging Face model directory from another one or from a preset.

    Args:
        source: A Hugging Face model directory, or a preset name (e.g. llama-3.2-1b) with --random_init.
        out: Output directory (created if missing).
        dtype: Weight dtype to save: auto (keep), float32, bfloat16 or float16.
        max_shard_size: Shard the weights above this size, e.g. 5GB or 500MB.
        random_init: Build the model with fresh random weights instead of loading them.
        seed: Random seed for --random_init.
    """
    from pathlib import Path

    import lmstack
    from lmstack.checkpoint.files import parse_size
    from lmstack.checkpoint.hf import resolve_dtype
    from lmstack.errors import CheckpointError

    if Path(out).resolve() == Path(source).resolve():
        raise CheckpointError(f"--out {out} is the source directory; write to a new directory")
    if Path(out).is_file():
        raise CheckpointError(f"--out {out} is a file; give a directory to write the model to")
    parse_size(max_shard_size)  # a bad size fails before the model is loaded
    shipped = _source_generation_config(Path(source))
    model, tokenizer = lmstack.load(source, random_init=random_init, dtype=resolve_dtype(dtype), seed=seed)
    path = model.save_pretrained(out, tokenizer=tokenizer, max_shard_size=max_shard_size,
                                 generation_defaults=shipped)
    n = model.num_parameters()
    print(f"wrote {path} ({model.config.family}, {n / 1e6:.1f}M parameters, {model.dtype})")


def _source_generation_config(source):
    """The source's generation_config.json as a dict (checked to be a JSON object), or None.

    It holds what config.json does not: the full list of stop ids and the sampling defaults
    (temperature, top_p, do_sample) the model was released with. Without carrying it over, a
    converted model stops only on config.json's single eos id and samples with library defaults.
    """
    import json

    from lmstack.errors import CheckpointError

    path = source / "generation_config.json"
    if not source.is_dir() or not path.is_file():
        return None
    try:
        parsed = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path} must hold a JSON object of generation settings, got "
                              f"{type(parsed).__name__}; fix or remove it")
    return parsed

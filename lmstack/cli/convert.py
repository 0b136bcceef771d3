"""`lmstack convert`: Hugging Face directory (or preset) -> Hugging Face directory.

Since lmstack's format *is* the HF format, converting means: normalise a checkpoint of a
supported family, change its dtype, reshard it, or materialise a preset with fresh weights.
The source's generation_config.json (stop ids, sampling defaults) travels on the loaded model's
config (`generation_defaults`) and is written out with it.
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
    model, tokenizer = lmstack.load(source, random_init=random_init, dtype=resolve_dtype(dtype), seed=seed)
    path = model.save_pretrained(out, tokenizer=tokenizer, max_shard_size=max_shard_size)
    n = model.num_parameters()
    print(f"wrote {path} ({model.config.family}, {n / 1e6:.1f}M parameters, {model.dtype})")


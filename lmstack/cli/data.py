"""`lmstack tokenizer train` and `lmstack data prepare`: the data stage from the command line.

Both read the same inputs (files, folders, globs, .jsonl, .parquet, the built-in `stdlib`
corpus); several inputs are given as `--input '[a.jsonl, b/]'` or `--input+ a --input+ b`.
Each prints a short report; `data prepare` also writes it to OUT/report.json.
"""

from __future__ import annotations

from typing import Any


def _inputs(value: str | list[str] | None) -> list[str]:
    from lmstack.errors import DataError

    if not value:
        raise DataError("--input is required: files, folders, globs, .jsonl/.parquet files or `stdlib`")
    return [value] if isinstance(value, str) else list(value)


def _require(name: str, value: str | None) -> str:
    from lmstack.errors import ConfigError

    if not value:
        raise ConfigError(f"--{name} is required")
    return value


def _check_out_dir(out: str) -> None:
    """--out must be a directory (or not exist yet), never a regular file."""
    from pathlib import Path

    from lmstack.data.pipeline import file_in_the_way
    from lmstack.errors import ConfigError

    where = file_in_the_way(Path(out))
    if where:
        raise ConfigError(f"--out {out} {where}; give a directory")


def tokenizer_train(
    input: str | list[str] | None = None,
    out: str | None = None,
    vocab_size: int = 32000,
    min_frequency: int = 2,
    special_tokens: list[str] | None = None,
    text_field: str = "text",
    skip_bad: bool = False,
    max_bytes: str = "0",
    add_bos_token: bool = False,
    model_max_length: int = 2048,
) -> None:
    """Train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory.

    Args:
        input: Text files, folders, globs, .jsonl/.parquet files or a built-in corpus (stdlib).
        out: Output directory for tokenizer.json and tokenizer_config.json.
        vocab_size: Learned vocabulary: 256 bytes + merges (256 = pure bytes); special tokens come on top.
        min_frequency: A pair must occur this often to be merged.
        special_tokens: Special tokens (default <|bos|> <|eos|> <|pad|> <|im_start|> <|im_end|>).
        text_field: Field holding the text in .jsonl/.parquet inputs.
        skip_bad: Skip (and count) malformed records instead of stopping at the first.
        max_bytes: Train on at most this much text, e.g. 500MB (0 = all of it).
        add_bos_token: Prepend BOS when encoding with special tokens.
        model_max_length: model_max_length written to tokenizer_config.json.
    """
    import time

    from tqdm.auto import tqdm

    from lmstack.data.sources import BadRecord, iter_documents
    from lmstack.errors import ConfigError
    from lmstack.tokenizer import Tokenizer
    from lmstack.tokenizer.train import DEFAULT_SPECIAL_TOKENS

    inputs, out = _inputs(input), _require("out", out)
    _check_out_dir(out)
    if model_max_length < 1:
        raise ConfigError(f"--model-max-length {model_max_length} must be a positive number of tokens "
                          "(the longest input the model takes, e.g. 2048)")
    limit = _parse_size(max_bytes)
    bad: list[BadRecord] = []
    seen = {"bytes": 0, "docs": 0}
    bars = []  # made when the trainer reads the first text: a bad option fails before any bar is drawn

    def texts():
        bars.append(bar := tqdm(unit="B", unit_scale=True, desc="tokenizer train (reading)"))
        for doc in iter_documents(inputs, text_field=text_field, skip_bad=skip_bad, bad=bad):
            size = len(doc.text.encode("utf-8"))
            if limit and seen["bytes"] + size > limit and seen["docs"]:
                return
            seen["bytes"] += size
            seen["docs"] += 1
            bar.update(size)
            yield doc.text

    started = time.perf_counter()
    try:
        tokenizer = Tokenizer.train(texts(), vocab_size, special_tokens=special_tokens or DEFAULT_SPECIAL_TOKENS,
                                    min_frequency=min_frequency, add_bos_token=add_bos_token,
                                    model_max_length=model_max_length, show_progress=True)
    finally:
        for bar in bars:
            bar.close()
    tokenizer.save(out)
    learned = tokenizer.backend.get_vocab_size(with_added_tokens=False)
    skipped = f", {len(bad)} bad records skipped (e.g. {bad[0]})" if bad else ""
    print(f"wrote {out}: vocab {tokenizer.vocab_size} ({learned} learned + special tokens), trained on "
          f"{seen['docs']} documents / {seen['bytes'] / 1e6:.1f} MB in {time.perf_counter() - started:.1f}s"
          + skipped)
    if learned < vocab_size:
        print(f"  warning: learned only {learned} of the requested --vocab-size {vocab_size} tokens "
              f"(256 bytes + {learned - 256} merges): the corpus has no more pairs occurring at least "
              f"--min-frequency {min_frequency} times; give more text or a smaller --vocab-size")


def data_prepare(
    input: str | list[str] | None = None,
    tokenizer: str | None = None,
    out: str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.005,
    shard_tokens: int = 100_000_000,
    workers: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
    restart: bool = False,
    nfc: bool = True,
    strip_control: bool = True,
    min_chars: int = 1,
    max_chars: int = 0,
    max_non_alnum_ratio: float = 1.0,
    max_repeated_line_ratio: float = 1.0,
    dedup: bool = True,
    near_dedup: bool = False,
    near_dedup_threshold: float = 0.8,
) -> None:
    """Clean, deduplicate and tokenize a corpus into token shards for pretraining.

    Args:
        input: Text files, folders, globs, .jsonl/.parquet files or a built-in corpus (stdlib).
        tokenizer: Tokenizer directory (tokenizer.json), e.g. from `lmstack tokenizer train` or a model.
        out: Output directory: train_*.bin, val_*.bin, index.json, report.json, tokenizer/.
        text_field: Field holding the text in .jsonl/.parquet inputs.
        val_fraction: Share of documents held out for validation (every 1/fraction-th document).
        shard_tokens: Tokens per shard file.
        workers: Worker processes (0 = one per CPU core, 1 = in this process).
        skip_bad: Skip (and count) malformed records instead of stopping at the first.
        overwrite: Rebuild OUT even if it already holds prepared data.
        restart: Start over instead of resuming an interrupted run in OUT.
        nfc: Normalize text to Unicode NFC.
        strip_control: Remove control characters (tab, newline and CR are kept).
        min_chars: Drop documents shorter than this many characters.
        max_chars: Drop documents longer than this many characters (0 = no limit).
        max_non_alnum_ratio: Drop documents whose share of non-alphanumeric visible characters is higher.
        max_repeated_line_ratio: Drop documents whose share of repeated lines is higher.
        dedup: Drop exact duplicate documents.
        near_dedup: Drop near-duplicate documents (MinHash + LSH on word 5-grams).
        near_dedup_threshold: Jaccard similarity at which documents count as near duplicates.
    """
    from lmstack.data.clean import CleanConfig
    from lmstack.data.pipeline import PrepareConfig, prepare

    clean = CleanConfig(nfc=nfc, strip_control=strip_control, min_chars=min_chars, max_chars=max_chars,
                        max_non_alnum_ratio=max_non_alnum_ratio, max_repeated_line_ratio=max_repeated_line_ratio,
                        dedup=dedup, near_dedup=near_dedup, near_dedup_threshold=near_dedup_threshold)
    config = PrepareConfig(inputs=_inputs(input), tokenizer=_require("tokenizer", tokenizer),
                           out=_require("out", out), text_field=text_field, val_fraction=val_fraction,
                           shard_tokens=shard_tokens, workers=workers, skip_bad=skip_bad, overwrite=overwrite,
                           restart=restart, clean=clean)
    report = prepare(config)
    print(format_report(report))


def format_report(report: Any) -> str:
    c = report.cleaning
    lines = [f"prepared {report.out} in {report.seconds:.1f}s with {report.workers} workers "
             f"({report.input_bytes / 1e6:.1f} MB, {report.mb_per_s:.2f} MB/s)"
             + (f", resumed after {report.resumed_items} work items" if report.resumed_items else "")]
    for split, s in report.splits.items():
        lines.append(f"  {split:5s} {s['num_tokens']:>14,} tokens  {s['num_documents']:>10,} documents  "
                     f"{s['shards']} shards")
    lines.append(f"  read {c['input_documents']:,} documents ({c['input_bytes'] / 1e6:.1f} MB); removed:")
    zero = {"documents": 0, "bytes": 0}
    steps = {f"filter {k}": c["filtered"].get(k, zero)
             for k in ("min_chars", "max_chars", "non_alnum_ratio", "repeated_line_ratio")}
    steps |= {"exact duplicates": c["exact_duplicates"], "near duplicates": c["near_duplicates"]}
    width = max(map(len, steps))  # "filter repeated_line_ratio" is the longest name
    for name, step in steps.items():
        lines.append(f"    {name:{width}s} {step['documents']:>10,} documents {step['bytes']:>14,} bytes")
    lines.append(f"  rewrote: NFC {c['nfc_changed']['documents']:,} documents, control characters in "
                 f"{c['control_chars_removed']['documents']:,} documents ({c['control_chars_removed']['bytes']:,} bytes)")
    if report.bad_records:
        lines.append(f"  skipped {report.bad_records:,} bad records, e.g. " + "; ".join(report.bad_examples[:3]))
    lines.extend(f"  warning: {w}" for w in report.warnings)
    return "\n".join(lines)


def _parse_size(text: str | int) -> int:
    from lmstack.errors import ConfigError

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    value = str(text).strip().upper()
    number = value.rstrip("KMGTB")
    unit = value[len(number):]
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"--max-bytes {text!r} is not a size like 0, 500MB or 2GB") from None
    # float() also takes "-1", "nan" and "inf": a negative limit used to mean "train on one document".
    if not size >= 0 or size == float("inf"):
        raise ConfigError(f"--max-bytes {text!r} must be a size >= 0 like 500MB or 2GB (0 = all of the text)")
    return int(size)

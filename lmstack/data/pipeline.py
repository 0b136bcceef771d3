"""`lmstack data prepare`: inputs -> cleaned, deduplicated, tokenized shards + index.json.

Worker processes read, clean and tokenize work items (~1 MB each) in parallel; the main
process takes their results strictly in input order, drops duplicates, picks validation
documents and writes shards, so the output is byte-identical for any number of workers.
After each shard it checkpoints (`OUT/.prepare/`: counters, leftover tokens, dedup keys),
so an interrupted run resumes where it stopped and finishes with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.data.clean import CleanConfig, CleaningStats, Deduplicator
from lmstack.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    SPLITS,
    ShardWriter,
    atomic_write,
    atomic_write_json,
    token_dtype,
)
from lmstack.data.sources import BadRecord, InputFile, parquet_num_rows, plan_spans, resolve_inputs
from lmstack.data.worker import ItemProcessor, ItemResult, WorkerSetup, WorkItem, init_worker, run_item
from lmstack.errors import ConfigError, DataError
from lmstack.tokenizer import Tokenizer

STATE_DIR = ".prepare"
REPORT_FILE = "report.json"


@dataclass
class PrepareConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    text_field: str = "text"
    val_fraction: float = 0.005
    shard_tokens: int = 100_000_000
    workers: int = 0  # 0: one per CPU core; 1: in this process
    skip_bad: bool = False
    overwrite: bool = False
    restart: bool = False  # ignore an interrupted run's checkpoint and start over
    clean: CleanConfig = field(default_factory=CleanConfig)
    text_piece_bytes: int = 1 << 16  # text files are cut into documents of about this size
    item_bytes: int = 1 << 18  # work handed to a worker at a time (small: even finish across workers)
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse bad options before anything is read or written, naming the CLI flag."""
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if self.shard_tokens < 1:
            raise DataError(f"--shard-tokens {self.shard_tokens} must be positive")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"--workers {self.workers!r} must be a number of worker processes >= 1, "
                              "or 0 for one per CPU core")
        for name in ("text_piece_bytes", "item_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PrepareConfig.{name}={getattr(self, name)} must be positive")
        self.clean.validate()


@dataclass
class PrepareReport:
    out: str
    splits: dict[str, dict[str, int]]
    cleaning: dict[str, Any]
    bad_records: int
    bad_examples: list[str]
    input_bytes: int
    seconds: float
    workers: int
    resumed_items: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


class ValidationSelector:
    """Every 1/fraction-th kept document goes to validation: exact share, spread over the corpus."""

    def __init__(self, fraction: float, count: int = 0):
        self.fraction = fraction
        self.count = count

    def next_is_val(self) -> bool:
        k, f = self.count, self.fraction
        self.count += 1
        return math.floor((k + 1) * f + 0.5) > math.floor(k * f + 0.5)


def plan_items(resolved: list[tuple[str, list[InputFile]]], config: PrepareConfig) -> list[WorkItem]:
    items: list[WorkItem] = []
    for source, (_, files) in enumerate(resolved):
        parquet_bytes_per_row = {f.path: f.size / max(1, parquet_num_rows(f.path)) for f in files
                                 if f.kind == "parquet"}
        spans, size = [], 0
        for span in plan_spans(files, text_piece_bytes=config.text_piece_bytes, jsonl_span_bytes=config.item_bytes):
            spans.append(span)
            if span.kind == "parquet":  # only for the progress bar
                size += int((span.stop - span.start) * parquet_bytes_per_row[span.path])
            else:
                size += span.stop - span.start
            if size >= config.item_bytes or span.kind == "parquet":
                items.append(WorkItem(len(items), source, tuple(spans), size))
                spans, size = [], 0
        if spans:
            items.append(WorkItem(len(items), source, tuple(spans), size))
    return items


def run_fingerprint(resolved: list[tuple[str, list[InputFile]]], tokenizer: Tokenizer, config: PrepareConfig) -> str:
    """Identifies a run: same inputs (path, size, mtime), tokenizer and options -> may resume.

    The EOS id joins the tokenizer's fingerprint (which covers tokenizer.json only): it is set in
    tokenizer_config.json and ends every document, so an edit between runs must not mix two."""
    inputs = [[spec, [[f.path, f.size, (os.lstat if f.kind == "broken_link" else os.stat)(f.path).st_mtime_ns]
                      for f in files]] for spec, files in resolved]
    data = {"version": FORMAT_VERSION, "inputs": inputs, "tokenizer": tokenizer.fingerprint,
            "eos_id": tokenizer.eos_token_id,
            "options": output_options(config), "item_bytes": config.item_bytes}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def output_options(config: PrepareConfig) -> dict[str, Any]:
    """The options that change the output (workers, progress and the like do not)."""
    return {"text_field": config.text_field, "val_fraction": config.val_fraction,
            "shard_tokens": config.shard_tokens, "skip_bad": config.skip_bad, "clean": asdict(config.clean),
            "text_piece_bytes": config.text_piece_bytes}


class _Run:
    """The main process's side: ordered consumption of worker results, checkpoints, the index."""

    def __init__(self, config: PrepareConfig, tokenizer: Tokenizer, resolved, fingerprint: str):
        self.config = config
        self.out = Path(config.out)
        self.state_dir = self.out / STATE_DIR
        self.fingerprint = fingerprint
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.id_space = tokenizer.id_space  # not vocab_size: a vocabulary with gaps has ids >= its count
        self.dtype = token_dtype(self.id_space)
        self.writers = {s: ShardWriter(self.out, s, self.dtype, config.shard_tokens, self.eos_id) for s in SPLITS}
        self.dedup = Deduplicator(config.clean)
        self.selector = ValidationSelector(config.val_fraction)
        self.stats = CleaningStats()
        self.items_done = 0
        self.bad: list[BadRecord] = []
        self.bad_count = 0
        self.sources = [{"spec": spec, "files": len(files), "bytes": 0, "sha256": hashlib.sha256().hexdigest()}
                        for spec, files in resolved]
        self.checkpoints = 0
        self.hash_count = 0
        self.signature_count = 0

    # ---- consuming results -------------------------------------------------------------
    def consume(self, result: ItemResult) -> int:
        """Take one item's documents in order; returns how many shards that wrote."""
        for record in result.bad:
            if not self.config.skip_bad:
                raise DataError(f"{record}; fix the record or pass --skip-bad to skip and count bad records")
            self.bad_count += 1
            if len(self.bad) < 20:
                self.bad.append(record)
        self.stats.merge(result.stats)
        source = self.sources[result.source]
        source["bytes"] += result.raw_bytes
        source["sha256"] = hashlib.sha256(bytes.fromhex(source["sha256"]) + result.raw_sha256).hexdigest()
        written, start = 0, 0
        for j, length in enumerate(result.lengths.tolist()):
            ids = result.tokens[start:start + length]
            start += length
            nbytes = int(result.doc_bytes[j])
            if self.dedup.is_exact_duplicate(result.hashes[16 * j:16 * j + 16]):
                self.stats.exact_duplicates.add(nbytes)
                continue
            if result.signatures is not None and self.dedup.is_near_duplicate(result.signatures[j]):
                self.stats.near_duplicates.add(nbytes)
                continue
            self.stats.kept_documents += 1
            self.stats.kept_bytes += nbytes
            split = "val" if self.selector.next_is_val() else "train"
            written += self.writers[split].add(ids)
        self.items_done += 1
        return written

    # ---- checkpoints -------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Persist everything needed to continue from `items_done` (shards are already on disk)."""
        self.state_dir.mkdir(exist_ok=True)
        self._append("hashes.bin", b"".join(self.dedup.new_hashes))
        self.hash_count += len(self.dedup.new_hashes)
        self.dedup.new_hashes.clear()
        if self.dedup.new_signatures:
            self._append("signatures.bin", np.stack(self.dedup.new_signatures).astype(np.uint32).tobytes())
            self.signature_count += len(self.dedup.new_signatures)
            self.dedup.new_signatures.clear()
        self.checkpoints += 1
        buffers = {}
        for split, writer in self.writers.items():
            name = f"buffer_{split}_{self.checkpoints}.bin"
            data = writer.buffer().tobytes()
            atomic_write(self.state_dir / name, lambda h, d=data: h.write(d))
            buffers[split] = name
        state = {"fingerprint": self.fingerprint, "items_done": self.items_done, "buffers": buffers,
                 "writers": {s: w.state() for s, w in self.writers.items()}, "val_count": self.selector.count,
                 "stats": self.stats.to_dict(), "bad_count": self.bad_count,
                 "bad": [[b.path, b.line, b.reason] for b in self.bad], "sources": self.sources,
                 "hash_count": self.hash_count, "signature_count": self.signature_count,
                 "checkpoints": self.checkpoints}
        atomic_write_json(self.state_dir / "state.json", state)
        for old in self.state_dir.glob("buffer_*.bin"):
            if old.name not in buffers.values():
                old.unlink()

    def _append(self, name: str, data: bytes) -> None:
        if data:
            with open(self.state_dir / name, "ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())

    def restore(self, state: dict[str, Any]) -> None:
        self.items_done = state["items_done"]
        self.selector.count = state["val_count"]
        self.stats = CleaningStats.from_dict(state["stats"])
        self.bad_count = state["bad_count"]
        self.bad = [BadRecord(*b) for b in state["bad"]]
        self.sources = state["sources"]
        self.checkpoints = state["checkpoints"]
        self.hash_count, self.signature_count = state["hash_count"], state["signature_count"]
        for split, writer in self.writers.items():
            buffer = np.fromfile(self.state_dir / state["buffers"][split], dtype=self.dtype)
            writer.restore(state["writers"][split], buffer)
        hashes = self._read_log("hashes.bin", self.hash_count, 16, np.uint8)
        signatures = self._read_log("signatures.bin", self.signature_count, self.config.clean.num_perm, np.uint32)
        self.dedup.restore(hashes, signatures)

    def _read_log(self, name: str, count: int, width: int, dtype) -> np.ndarray:
        """An append-only log cut back to what the last checkpoint recorded."""
        path = self.state_dir / name
        nbytes = count * width * np.dtype(dtype).itemsize
        if count == 0:
            if path.exists():
                path.unlink()
            return np.zeros((0, width), dtype)
        with open(path, "r+b") as handle:
            handle.truncate(nbytes)
        return np.fromfile(path, dtype=dtype).reshape(count, width)

    # ---- finishing ---------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        for writer in self.writers.values():
            writer.finish()
        if self.writers["train"].tokens == 0 and self.writers["val"].documents:
            raise DataError(
                f"the train split is empty: all {self.writers['val'].documents} documents kept after cleaning "
                f"went to the validation split (--val-fraction {self.config.val_fraction} of "
                f"{self.stats.kept_documents} documents); lower --val-fraction (0 keeps every document for "
                "training) or add more data")
        if self.writers["train"].tokens == 0:
            s = self.stats
            raise DataError(
                f"the corpus is empty after cleaning: {s.input_documents} documents read, "
                f"{sum(c.documents for c in s.filtered.values())} removed by filters "
                f"({', '.join(f'{k}: {c.documents}' for k, c in s.filtered.items()) or 'none'}), "
                f"{s.exact_duplicates.documents} exact and {s.near_duplicates.documents} near duplicates, "
                f"{self.bad_count} bad records skipped; check --input and the filter options")
        self.tokenizer.save(self.out / "tokenizer")
        index = {
            "format": FORMAT, "version": FORMAT_VERSION, "dtype": self.dtype.name,
            "vocab_size": self.id_space, "eos_token_id": self.eos_id,
            "bos_token_id": self.tokenizer.bos_token_id,
            "tokenizer": {"fingerprint": self.tokenizer.fingerprint, "dir": "tokenizer"},
            "documents": "each document is followed by eos_token_id",
            "splits": {s: w.summary() for s, w in self.writers.items()},
            "inputs": self.sources, "options": output_options(self.config),
            "cleaning": self.stats.to_dict(), "bad_records_skipped": self.bad_count,
        }
        atomic_write_json(self.out / INDEX_FILE, index)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return index


def _is_lmstack_index(path: Path) -> bool:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("format") == FORMAT


def _output_files(out: Path) -> list[Path]:
    """Files in OUT that a run writes (and so would replace or remove): shards, report, tokenizer."""
    found = [p for split in SPLITS for pattern in (f"{split}_*.bin", f".{split}_*.bin.tmp")
             for p in sorted(out.glob(pattern))]
    found += [p for p in (out / REPORT_FILE, out / "tokenizer" / "tokenizer.json",
                          out / "tokenizer" / "tokenizer_config.json") if p.exists()]
    return found


def file_in_the_way(out: Path) -> str | None:
    """Why OUT cannot become a directory ("is a file", "is inside X, which is a file"), or None."""
    for candidate in [out, *out.parents]:
        if candidate.exists():
            if candidate.is_dir():
                return None
            return "is a file" if candidate == out else f"is inside {candidate}, which is a file"
    return None


def _check_out_dir(out: Path, config: PrepareConfig) -> None:
    """Refuse an --out that is a file, or that holds files no earlier lmstack run in it wrote.

    `data prepare` replaces shards, report.json and tokenizer/ only in a directory that is
    recognisably its own: one with an lmstack index.json (rebuilt with --overwrite) or with
    the checkpoint directory of an interrupted run (.prepare/, written before the first shard).
    """
    where = file_in_the_way(out)
    if where:
        raise DataError(f"--out {config.out} {where}; give a directory")
    if not out.is_dir():
        return
    index = out / INDEX_FILE
    if index.exists():
        if not _is_lmstack_index(index):
            raise DataError(f"--out {config.out} holds an {INDEX_FILE} that is not an lmstack data index; "
                            "choose an empty directory or remove it")
        if not config.overwrite:
            raise DataError(f"{out} already holds prepared data ({INDEX_FILE}); pass --overwrite to rebuild "
                            "it or choose another --out")
        return
    if (out / STATE_DIR).is_dir():
        return
    foreign = _output_files(out)
    if foreign:
        shards = [p for p in foreign if p.suffix in (".bin", ".tmp")]
        kind = "shard files" if shards else "files"
        names = ", ".join(str(p.relative_to(out)) for p in (shards or foreign)[:3])
        more = ", ..." if len(shards or foreign) > 3 else ""
        raise DataError(f"--out {config.out} already holds {kind} ({names}{more}) that no lmstack data index "
                        "describes; choose an empty directory or remove them")


def _prepare_out_dir(out: Path, config: PrepareConfig, fingerprint: str) -> dict[str, Any] | None:
    """Make OUT ready; returns a checkpoint to resume from, if there is a matching one.

    Only called after `_check_out_dir`: anything removed here was written by an earlier run.
    """
    state_dir = out / STATE_DIR
    state_path = state_dir / "state.json"
    if state_path.exists() and not config.restart and not config.overwrite:
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            state = {}
        if state.get("fingerprint") == fingerprint:
            return state
        print(f"lmstack: {out} holds an interrupted run with other inputs or options; starting over")
    # Keep OUT recognisable at every moment (.prepare/ or index.json exists), so an interruption
    # here never leaves shards that a rerun would have to refuse as someone else's.
    state_dir.mkdir(exist_ok=True)
    for child in state_dir.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    for stale in _output_files(out):  # of an earlier, unfinished or overwritten run
        if stale.parent == out:  # tokenizer/ is rewritten at the end (it may be the --tokenizer itself)
            stale.unlink()
    (out / INDEX_FILE).unlink(missing_ok=True)
    return None


def _check(config: PrepareConfig, tokenizer: Tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {config.tokenizer} names no eos_token (or it is not in the vocabulary); "
                        "documents are separated by EOS, so set eos_token in its tokenizer_config.json")


def prepare(config: PrepareConfig) -> PrepareReport:
    """Run the pipeline; see the module docstring. Returns counts and timings (also in report.json)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    config.validate()
    _check_out_dir(Path(config.out), config)
    tokenizer = Tokenizer.load(config.tokenizer)
    _check(config, tokenizer)
    workers = config.workers or len(os.sched_getaffinity(0))
    setup = WorkerSetup(tokenizer.backend.to_str(), config.text_field, config.clean, single_thread=workers > 1)
    pool = None
    if workers > 1:  # start the workers first: they boot while this process plans the work
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(setup,))
    try:
        resolved = resolve_inputs(config.inputs, exclude=config.out)  # before OUT is cleared
        items = plan_items(resolved, config)
        fingerprint = run_fingerprint(resolved, tokenizer, config)
        out = Path(config.out)
        # Everything that can fail on the options is built before OUT is touched: with --overwrite,
        # _prepare_out_dir deletes the previous dataset.
        run = _Run(config, tokenizer, resolved, fingerprint)
        out.mkdir(parents=True, exist_ok=True)
        state = _prepare_out_dir(out, config, fingerprint)
        if state is not None:
            run.restore(state)
        else:  # mark OUT as this run's before the first shard, so a crash leaves a resumable directory
            run.checkpoint()
        todo = items[run.items_done:]
        results = pool.imap(run_item, todo, chunksize=1) if pool is not None else map(ItemProcessor(setup), todo)
        with tqdm(total=sum(i.nbytes for i in items), initial=sum(i.nbytes for i in items[:run.items_done]),
                  unit="B", unit_scale=True, desc="data prepare", disable=not config.progress) as bar:
            for item, result in zip(todo, results):
                if run.consume(result):
                    run.checkpoint()
                bar.update(item.nbytes)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    index = run.finish()
    report = PrepareReport(
        out=str(out), splits={s: {k: v for k, v in index["splits"][s].items() if k != "shards"} | {
            "shards": len(index["splits"][s]["shards"])} for s in SPLITS},
        cleaning=index["cleaning"], bad_records=run.bad_count, bad_examples=[str(b) for b in run.bad],
        input_bytes=sum(s["bytes"] for s in run.sources), seconds=time.perf_counter() - started,
        workers=workers, resumed_items=len(items) - len(todo),
    )
    if config.val_fraction > 0 and index["splits"]["val"]["num_tokens"] == 0:
        report.warnings.append(f"no validation documents: {run.stats.kept_documents} documents x "
                               f"--val-fraction {config.val_fraction} rounds to 0; raise --val-fraction")
    atomic_write_json(out / REPORT_FILE, asdict(report) | {"mb_per_s": report.mb_per_s})
    return report

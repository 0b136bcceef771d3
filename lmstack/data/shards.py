"""Token shards on disk: the format `data prepare` writes and `TokenDataset` reads.

A prepared directory holds `train_000000.bin`, ... and `val_000000.bin`, ... (raw uint16 or
uint32 token ids, documents separated by EOS) and `index.json`, which lists every shard with
its token count and sha256. Shards and the index are written to a temporary name and renamed,
and the index is written last, so a loader never reads a half-written shard or a half-run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lmstack.errors import DataError

INDEX_FILE = "index.json"
FORMAT = "lmstack-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(id_space: int) -> np.dtype:
    """uint16 when every id fits (all ids < id_space <= 65536), else uint32.

    Pass the largest id + 1 (`Tokenizer.id_space`), not the token count: they differ for a
    vocabulary with gaps, and a count would pick uint16 for ids that wrap around.
    """
    return np.dtype(np.uint16) if id_space <= 1 << 16 else np.dtype(np.uint32)


def _check_ids(ids: np.ndarray, dtype: np.dtype, what: str) -> None:
    """Refuse ids that `dtype` cannot hold: numpy's astype would wrap them silently."""
    if len(ids) == 0:
        return
    low, high = int(np.min(ids)), int(np.max(ids))
    limit = np.iinfo(dtype).max
    if low < 0 or high > limit:
        bad = low if low < 0 else high
        raise DataError(f"{what}: token id {bad} does not fit {dtype.name} shards (ids 0..{limit}); "
                        "the tokenizer's ids exceed its vocabulary size, so choose the shard dtype from "
                        "the largest id (Tokenizer.id_space) or fix the tokenizer's vocabulary")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(handle)` to a temporary file, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda h: h.write(text.encode("utf-8")))


def shard_name(split: str, number: int) -> str:
    return f"{split}_{number:06d}.bin"


class ShardWriter:
    """Appends documents (+ EOS) to a token stream and writes it out in fixed-size shards."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, eos_id: int):
        self.directory = directory
        self.split = split
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        _check_ids(np.array([eos_id], dtype=np.int64), np.dtype(dtype), "eos_token_id")
        self.eos = np.array([eos_id], dtype=dtype)
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.tokens = 0

    def add(self, ids: np.ndarray) -> int:
        """Add one document; returns how many shards this completed (and wrote)."""
        if ids.dtype != self.dtype:
            _check_ids(ids, self.dtype, f"a {self.split} document")
        self.pending.append(ids.astype(self.dtype, copy=False))
        self.pending.append(self.eos)
        n = len(ids) + 1
        self.pending_tokens += n
        self.tokens += n
        self.documents += 1
        written = 0
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[:self.shard_tokens])
            rest = stream[self.shard_tokens:]
            self.pending, self.pending_tokens = ([rest] if len(rest) else []), len(rest)
            written += 1
        return written

    def finish(self) -> None:
        """Write what is left as the last (shorter) shard."""
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
            self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = shard_name(self.split, len(self.shards))
        atomic_write(self.directory / name, lambda h: h.write(tokens.tobytes()))
        self.shards.append({"file": name, "num_tokens": int(len(tokens)),
                            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()})

    # ---- resume ------------------------------------------------------------------------
    def buffer(self) -> np.ndarray:
        return np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)

    def state(self) -> dict[str, Any]:
        return {"shards": self.shards, "documents": self.documents, "tokens": self.tokens}

    def restore(self, state: dict[str, Any], buffer: np.ndarray) -> None:
        self.shards = list(state["shards"])
        self.documents, self.tokens = state["documents"], state["tokens"]
        self.pending = [buffer.astype(self.dtype)] if len(buffer) else []
        self.pending_tokens = len(buffer)

    def summary(self) -> dict[str, Any]:
        return {"num_tokens": self.tokens, "num_documents": self.documents, "shards": self.shards}


def read_index(data_dir: str | Path) -> dict[str, Any]:
    """index.json of a prepared directory, checked; DataError says what to run when it is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; create it with "
                        f"`lmstack data prepare --input ... --tokenizer ... --out {data_dir}`")
    path = data_dir / INDEX_FILE
    if not path.is_file():
        hint = " (an interrupted `data prepare` left it unfinished: run it again to resume)" \
            if (data_dir / ".prepare").exists() else ""
        raise DataError(f"{data_dir} has no {INDEX_FILE}{hint}; prepare it with `lmstack data prepare`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); prepare the data again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not an lmstack token index (format {FORMAT!r})")
    return index


def open_split(data_dir: str | Path, index: dict[str, Any], split: str) -> list[np.memmap]:
    """Memory maps of a split's shards, each checked against the size the index records."""
    if split not in index["splits"]:
        raise DataError(f"{data_dir} has no split {split!r} (splits: {', '.join(index['splits'])})")
    dtype = np.dtype(index["dtype"])
    maps = []
    for shard in index["splits"][split]["shards"]:
        path = Path(data_dir) / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in {INDEX_FILE} is missing; prepare the data again")
        expected = shard["num_tokens"] * dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(f"shard {path} has {path.stat().st_size} bytes, {INDEX_FILE} says {expected}; "
                            "it is damaged, prepare the data again")
        maps.append(np.memmap(path, dtype=dtype, mode="r"))
    return maps

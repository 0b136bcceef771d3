"""TokenDataset: fixed-length training windows from prepared shards, resumable and rank-disjoint.

Sampling. The split's shards form one token stream of N tokens. An epoch cuts it into
W = (N - T) // T windows of T + 1 tokens (x = first T, y = last T), starting at an offset
o that is 0 in epoch 0 and drawn uniformly from [0, N - 1 - W*T] (at least T - 1 spare
tokens) after (seed, epoch) later, so every epoch cuts the text at new places. This matters:
a small corpus is seen for many epochs, and windows that always start at the same tokens
get memorised (nanoGPT's random offsets give the same variety; ours keep ranks disjoint). The window order is a permutation drawn from (seed, epoch); the
i-th window a rank takes is perm[i * world_size + rank], so ranks never share a window and
together cover the epoch. The position is (epoch, i): `state_dict()` saves it, and after
`load_state_dict()` the batches continue exactly as an uninterrupted run would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.data.shards import open_split, read_index
from lmstack.errors import DataError


class TokenDataset:
    def __init__(self, data_dir: str | Path, seq_len: int, split: str = "train", rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.data_dir = Path(data_dir)
        self.index = read_index(self.data_dir)
        self.split, self.seq_len, self.rank, self.world_size, self.seed = split, seq_len, rank, world_size, seed
        self.shards = open_split(self.data_dir, self.index, split)
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self.shard_starts[-1])
        self.vocab_size = int(self.index["vocab_size"])
        self.eos_token_id = int(self.index["eos_token_id"])
        # One window fewer than fits, so the epoch offset can move the cut by up to seq_len - 1.
        shiftable = (self.num_tokens - seq_len) // seq_len if self.num_tokens >= seq_len else 0
        fitting = (self.num_tokens - 1) // seq_len if self.num_tokens else 0
        self.windows_per_epoch = shiftable if shiftable >= world_size else fitting
        self.eval_windows = fitting  # evaluation reads every whole window at offset 0
        if self.windows_per_epoch < world_size:
            raise DataError(
                f"split {split!r} of {self.data_dir} has {self.num_tokens} tokens: too few for one window of "
                f"seq_len={seq_len} (+1) per rank ({world_size} ranks); lower seq_len or add data")
        self.epoch = 0
        self.step = 0  # windows this rank has taken in the current epoch
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    @property
    def tokenizer_dir(self) -> Path:
        return self.data_dir / self.index["tokenizer"]["dir"]

    @property
    def windows_per_rank(self) -> int:
        return self.windows_per_epoch // self.world_size

    # ---- sampling ----------------------------------------------------------------------
    def _epoch_layout(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, window order) of an epoch, a pure function of (seed, epoch)."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            spare = self.num_tokens - 1 - self.windows_per_epoch * self.seq_len
            offset = int(rng.integers(0, spare + 1)) if epoch > 0 else 0
            self._offset = offset
            self._order = rng.permutation(self.windows_per_epoch)
            self._order_epoch = epoch
        return self._offset, self._order

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream, across shard edges."""
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            begin = start + filled - int(self.shard_starts[shard])
            piece = self.shards[shard][begin:begin + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def _window(self, offset: int, k: int) -> np.ndarray:
        return self._read(offset + k * self.seq_len, self.seq_len + 1)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 (batch_size, seq_len), y = x shifted by one token."""
        rows = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for b in range(batch_size):
            if self.step >= self.windows_per_rank:
                self.epoch, self.step = self.epoch + 1, 0
            offset, order = self._epoch_layout(self.epoch)
            rows[b] = self._window(offset, int(order[self.step * self.world_size + self.rank]))
            self.step += 1
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def iter_eval_batches(self, batch_size: int, max_batches: int | None = None):
        """Windows 0, 1, 2, ... of the split (offset 0, no shuffle), this rank's share, in order."""
        windows = range(self.rank, self.eval_windows, self.world_size)
        for n, first in enumerate(range(0, len(windows), batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            batch = torch.from_numpy(np.stack([self._window(0, k) for k in windows[first:first + batch_size]]))
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.step * self.world_size, "seed": self.seed,
                "seq_len": self.seq_len, "num_tokens": self.num_tokens, "split": self.split,
                "world_size": self.world_size, "tokenizer": self.index["tokenizer"]["fingerprint"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. A different world size continues the same global order
        (rounded down to a whole step of the new world size)."""
        for key in ("seed", "seq_len", "num_tokens", "split", "tokenizer"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise DataError(f"data state was saved with {key}={state.get(key)!r} but this dataset has "
                                f"{key}={mine!r}; resume with the same data and settings")
        self.epoch = int(state["epoch"])
        self.step = int(state["consumed"]) // self.world_size

    def __repr__(self) -> str:
        return (f"TokenDataset({self.data_dir}, split={self.split}, tokens={self.num_tokens}, "
                f"seq_len={self.seq_len}, rank={self.rank}/{self.world_size})")

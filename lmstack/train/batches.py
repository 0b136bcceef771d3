"""One batch type for both training tasks, and opening the datasets a config names.

Pretraining loaders give `(x, y)` with y already shifted; the SFT loader gives a dict with
HF-style aligned labels (-100 off the assistant turns), positions and document ids of packed
conversations. `Batch` holds either, knows which way its labels are aligned and how many
tokens carry a loss, which is what exact gradient accumulation needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import DataError
from lmstack.model.transformer import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX where no loss
    shift_labels: bool  # True: labels aligned with input_ids (the model shifts); False: already shifted
    positions: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None

    @classmethod
    def of(cls, raw: Any) -> Batch:
        """From a pretraining `(x, y)` pair or an SFT dict."""
        if isinstance(raw, Batch):
            return raw
        if isinstance(raw, (tuple, list)) and len(raw) == 2:
            return cls(raw[0], raw[1], shift_labels=False)
        if isinstance(raw, dict):
            return cls(raw["input_ids"], raw["labels"], shift_labels=True, positions=raw.get("positions"),
                       document_ids=raw.get("document_ids"))
        raise TypeError(f"a dataset batch must be (x, y) or a dict with input_ids/labels, got {type(raw).__name__}")

    def to(self, device: torch.device) -> Batch:
        pin = device.type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.labels), self.shift_labels, move(self.positions),
                     move(self.document_ids))

    def num_targets(self) -> torch.Tensor:
        """Tokens that carry a loss (after the shift), as a 0-d int64 tensor."""
        labels = self.labels[:, 1:] if self.shift_labels else self.labels
        return (labels != IGNORE_INDEX).sum()

    def model_inputs(self) -> dict[str, Any]:
        return dict(input_ids=self.input_ids, labels=self.labels, shift_labels=self.shift_labels,
                    positions=self.positions, document_ids=self.document_ids)


def open_pretraining_data(data_dir: str | None, seq_len: int, rank: int, world_size: int, seed: int,
                          val_dir: str | None = None):
    """(train, val or None) token datasets of `lmstack data prepare` directories.

    Validation comes from `val_dir` when given (its val split, or its train split if it has
    none: a held-out corpus prepared on its own), else from the data directory's val split.
    """
    if data_dir is None:
        raise DataError("no training data: pass --data DIR (a directory made by `lmstack data prepare`)")
    for option, p in (("--data", data_dir), ("--val_data", val_dir)):
        if p is not None and Path(p).is_file():
            raise DataError(f"{option} {p} is a file; pretraining reads a directory of token shards: make one with "
                            f"`lmstack data prepare --input {p} --tokenizer TOK --out DIR` and pass {option} DIR")
        if p is not None and not Path(p).is_dir():
            raise DataError(f"data directory {p} does not exist; create it with `lmstack data prepare --out {p}`")
    from lmstack.data import TokenDataset
    from lmstack.data.shards import read_index

    def split_of(path: str | None) -> str | None:
        splits = {name: s for name, s in read_index(path).get("splits", {}).items() if s.get("num_tokens", 1) > 0}
        return "val" if "val" in splits else ("train" if path == val_dir and "train" in splits else None)

    train = TokenDataset(data_dir, seq_len, split="train", rank=rank, world_size=world_size, seed=seed)
    source = val_dir if val_dir is not None else data_dir
    split = split_of(source)
    val = None  # a corpus prepared without (or with an empty) validation split has none
    if split is not None:
        val = TokenDataset(source, seq_len, split=split, rank=rank, world_size=world_size, seed=seed)
        if val.vocab_size != train.vocab_size:
            raise DataError(f"validation data {source} was tokenized with another vocabulary ({val.vocab_size} "
                            f"tokens) than {data_dir} ({train.vocab_size}); prepare both with one tokenizer")
    return train, val


def open_sft_data(path: str | None, val_path: str | None, tokenizer, seq_len: int, pack: bool, rank: int,
                  world_size: int, seed: int, skip_bad: bool = False):
    """(train, val or None) chat datasets from JSONL files, loss on assistant tokens only."""
    if path is None:
        raise DataError("no training data: pass --data FILE.jsonl (one conversation per line)")
    for option, p in (("--data", path), ("--val_data", val_path)):
        if p is not None and Path(p).is_dir():
            raise DataError(f"{option} {p} is a directory; fine-tuning reads a .jsonl (or .json list) file of "
                            "conversations ({'messages': [{'role': ..., 'content': ...}, ...]} per line)")
        if p is not None and not Path(p).exists():
            raise DataError(f"{option} {p} does not exist; give a .jsonl file of conversations")
    if tokenizer is None:
        raise DataError("fine-tuning needs a tokenizer, and --model has none (a preset, or a directory without "
                        "tokenizer.json): pass --model DIR, a trained Hugging Face model with its tokenizer "
                        "(e.g. runs/quickstart/model), or --tokenizer DIR")
    from lmstack.data import SFTDataset

    train = SFTDataset(path, tokenizer, seq_len, pack=pack, rank=rank, world_size=world_size, seed=seed,
                       skip_bad=skip_bad)
    val = None
    if val_path is not None:
        val = SFTDataset(val_path, tokenizer, seq_len, pack=pack, rank=rank, world_size=world_size, seed=seed,
                         skip_bad=skip_bad)
    return train, val

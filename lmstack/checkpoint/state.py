"""Training checkpoints: an HF model directory plus `trainer_state/`, written atomically.

A checkpoint is `out_dir/checkpoints/step-00001000/` holding the model exactly as
`save_pretrained` writes it and `trainer_state/state.pt` (optimizer, step, data position, RNG
states) beside `trainer_state/train_config.yaml`. It is built under a hidden temporary name,
every file is fsynced, then one rename makes it visible: a directory named `step-*` is always
complete, so `--resume` never picks up half a checkpoint. Trainer state is read with
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmstack.checkpoint.weight_map import bias_stored_as_zeros
from lmstack.config import ModelConfig
from lmstack.errors import CheckpointError

STATE_DIR = "trainer_state"
STATE_FILE = "state.pt"
CONFIG_FILE = "train_config.yaml"
_STEP_DIR = re.compile(r"step-(\d+)$")
# Fields that decide the shapes of the weights and optimizer state: a checkpoint must match them all.
SHAPE_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "mlp", "num_experts", "position", "norm", "tie_embeddings", "attn_qkv_bias",
                "attn_out_bias", "mlp_bias", "qk_norm")


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and (path / STATE_DIR / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def incomplete_checkpoints(out_dir: str | Path) -> list[Path]:
    """`step-N` directories without `trainer_state/state.pt`, newer than every complete checkpoint:
    what `--resume` passes over (a directory edited by hand; our own writes are atomic)."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    newest = max((step for step, _ in list_checkpoints(out_dir)), default=-1)
    found = [(int(m.group(1)), path) for path in root.iterdir()
             if (m := _STEP_DIR.match(path.name)) and path.is_dir() and not (path / STATE_DIR / STATE_FILE).is_file()]
    return [path for step, path in sorted(found) if step > newest]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(out_dir: str | Path) -> None:
    """Delete temporary directories left by a run killed while saving."""
    root = checkpoints_root(out_dir)
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(tmp: Path, final: Path) -> None:
    """fsync everything under `tmp`, then atomically put it at `final` (replacing an older one)."""
    _fsync_tree(tmp)
    old = None
    if final.exists():  # rename cannot replace a non-empty directory: move the old one aside first
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out_dir: str | Path, step: int, write_model: Callable[[Path], Any], state: dict[str, Any],
                    train_config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`."""
    root = checkpoints_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_model(tmp)
    state_dir = tmp / STATE_DIR
    state_dir.mkdir()
    torch.save(state, state_dir / STATE_FILE)
    (state_dir / CONFIG_FILE).write_text(train_config_yaml)
    publish_directory(tmp, final)
    for _, path in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory (tensors and plain Python values only)."""
    path = Path(checkpoint) / STATE_DIR / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {checkpoint} is not a complete lmstack training checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: unpickling errors of many kinds
        raise CheckpointError(f"{path} could not be read as trainer state ({err}); delete this checkpoint "
                              "to resume from an older one") from None


def check_same_shape(saved: ModelConfig, wanted: ModelConfig, checkpoint: str | Path) -> None:
    """Refuse to resume a checkpoint whose model has another shape than the configured one."""
    diffs = [f"{name}={getattr(saved, name)!r} in the checkpoint but {getattr(wanted, name)!r} configured"
             for name in SHAPE_FIELDS  # a bias stored as zeros is absent in both (loading checks the zeros)
             if getattr(saved, name) != getattr(wanted, name) and not bias_stored_as_zeros(wanted, name)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {checkpoint} is from another model shape: {'; '.join(diffs)}. Resume with the same "
            "model options, or use another --out_dir to start a new run"
        )

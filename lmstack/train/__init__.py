"""Training: one loop for pretraining and fine-tuning (`Trainer`), configured by `TrainConfig`.

Imported lazily so the CLI can read `TrainConfig` for `--help` without loading torch.
"""

from __future__ import annotations

import importlib

_LAZY = {"TrainConfig": "lmstack.train.config", "Trainer": "lmstack.train.trainer"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmstack.train' has no attribute {name!r}")

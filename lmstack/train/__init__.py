"""Training: one loop for pretraining and fine-tuning (`Trainer`), configured by `TrainConfig`.

Imported lazily so the CLI can read `TrainConfig` for `--help` without loading torch.
"""

from __future__ import annotations

from lmstack.lazy import lazy_exports

_LAZY = {"TrainConfig": "lmstack.train.config", "Trainer": "lmstack.train.trainer"}
__getattr__, __all__ = lazy_exports(__name__, _LAZY)

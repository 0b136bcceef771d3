"""Training: one loop for pretraining and fine-tuning (`Trainer`), configured by `TrainConfig`."""

from lmstack.train.config import TrainConfig
from lmstack.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]

"""Subprocess of test_resume.py: a toy training run that is slow enough to be killed midway.

usage: python resume_driver.py OUT_DIR SECONDS_PER_BATCH
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from toy_data import ToyTokenDataset  # noqa: E402
from train_helpers import RESUME_RUN, tiny_config  # noqa: E402

from lmstack.train import Trainer  # noqa: E402


class SlowData(ToyTokenDataset):
    def __init__(self, *args, delay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def next_batch(self, batch_size):
        time.sleep(self.delay)
        return super().next_batch(batch_size)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, delay = sys.argv[1], float(sys.argv[2])
    config = tiny_config(out_dir, **RESUME_RUN)
    Trainer(config, train_data=SlowData(config.seq_len, delay=delay),
            val_data=ToyTokenDataset(config.seq_len, split="val")).fit()

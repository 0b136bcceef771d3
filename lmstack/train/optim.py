"""AdamW with weight-decay groups, and the learning-rate schedules (warmup + cosine, WSD, constant).

Decay goes to matrices only, as in nanoGPT: norms and biases (1-D) never decay, and embedding
tables decay only when asked (`decay_embeddings`). The schedule is a pure function of the step,
so resuming needs nothing but the step number: no scheduler object can drift out of sync.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmstack.train.config import TrainConfig

EMBEDDING_NAMES = ("embed.weight", "pos_embed.weight")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups: decayed matrices and the rest (names are kept for logs and tests)."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():  # tied weights appear once (named_parameters dedups)
        if not p.requires_grad:
            continue
        name = name.removeprefix("_orig_mod.").removeprefix("module.")
        is_embedding = name in EMBEDDING_NAMES
        if p.dim() >= 2 and (decay_embeddings or not is_embedding):
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel on CUDA and CPU (on a CPU it steps ~10x faster than the
    per-tensor loop torch picks by default there); foreach on other devices."""
    groups = param_groups(model, config.weight_decay, config.decay_embeddings)
    for group in groups:
        group.pop("names")
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps,
                             fused=fused, foreach=None if fused else True)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based).

    cosine: nanoGPT's `get_lr` (linear warmup to lr, cosine to min_lr at decay_steps, then min_lr).
    wsd: warmup, stable at lr, then a linear decay to min_lr over the last decay_steps steps.
    constant: warmup, then lr.
    """
    lr, min_lr, warmup = config.lr, config.min_lr, config.warmup_steps
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if config.schedule == "constant":
        return lr
    if config.schedule == "wsd":
        decay = config.wsd_decay_steps()
        start = config.max_steps - decay
        if step < start:
            return lr
        progress = min(1.0, (step - start + 1) / decay)
        return lr + progress * (min_lr - lr)
    decay_end = config.decay_steps or config.max_steps
    if step > decay_end:
        return min_lr
    ratio = (step - warmup) / max(1, decay_end - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
    return min_lr + coeff * (lr - min_lr)

"""Weight-decay groups and learning-rate schedules, against torch's own schedulers where they exist."""

from __future__ import annotations

import math

import pytest
import torch

import lmstack
from lmstack.errors import ConfigError
from lmstack.train.config import TrainConfig
from lmstack.train.optim import lr_at, param_groups


def test_decay_goes_to_matrices_only():
    model, _ = lmstack.load("tiny-gpt2", random_init=True, seed=0)  # tied embeddings, biases, LayerNorm
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "layers.0.attn.qkv.weight" in decay["names"] and "layers.1.mlp.down.weight" in decay["names"]
    assert {"embed.weight", "pos_embed.weight", "layers.0.attn.qkv.bias", "norm.weight"} <= set(no_decay["names"])
    assert all(p.dim() >= 2 for p in decay["params"])
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params  # tied lm_head counted once
    decay, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert "embed.weight" in decay["names"]


def reference_lrs(scheduler_factory, steps: int, lr: float) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler_factory(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_after_warmup_matches_torch_cosine_annealing():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, schedule="cosine")
    ref = reference_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100, eta_min=1e-4), 101, 1e-3)
    ours = [lr_at(10 + i, cfg) for i in range(101)]
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-12
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11) and lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(500, cfg) == 1e-4


def test_wsd_is_stable_then_decays_linearly():
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=5, max_steps=100, schedule="wsd", decay_steps=20)
    ref = reference_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, total_iters=20), 21, 1e-3)
    assert all(lr_at(s, cfg) == 1e-3 for s in range(5, 80))
    ours = [lr_at(79 + i, cfg) for i in range(21)]
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-12
    assert lr_at(99, cfg) == 0.0 and math.isclose(lr_at(89, cfg), 5e-4)


@pytest.mark.parametrize("schedule, decay_steps, message", [
    ("wsd", 11, r"decay_steps=11 with schedule wsd and max_steps=10, warmup_steps=4: the decay would overlap the "
                r"warmup and never reach lr; allowed: 1\.\.6 \(max_steps - warmup_steps\)"),
    ("wsd", 7, r"decay_steps=7 with schedule wsd .* allowed: 1\.\.6"),
    ("cosine", 3, r"decay_steps=3 with schedule cosine ends before warmup_steps=4, so lr is never reached; "
                  r"decay_steps must be >= warmup_steps \(4\)"),
])
def test_decay_steps_that_never_reach_lr_are_refused(schedule, decay_steps, message):
    settings = dict(lr=1.0, min_lr=0.1, max_steps=10, warmup_steps=4, schedule=schedule)
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings, decay_steps=decay_steps)
    # the edge is accepted: WSD with no stable step; a cosine at lr for exactly the step after warmup
    cfg = TrainConfig(**settings, decay_steps={"wsd": 6, "cosine": 4}[schedule])
    assert cfg.decay_steps in (6, 4)



@pytest.mark.parametrize("settings, message", [
    # the default warmup (100 steps) in a 50-step run: all warmup, lr never reached, no decay
    (dict(max_steps=50), r"warmup_steps=100 is not below max_steps=50: the whole run would be warmup "
                         r"and the learning rate would never reach lr=0\.001 .*pass --warmup_steps 5 .* or raise "
                         r"--max_steps above 100"),
    (dict(max_steps=50, schedule="wsd"), r"warmup_steps=100 is not below max_steps=50"),
    (dict(max_steps=30, warmup_steps=30, schedule="constant"), r"warmup_steps=30 is not below max_steps=30"),
    # WSD's default decay (20% = 22 steps) would start at step 88, inside the 100-step warmup: lr
    # climbed to 9.9e-4 and then dropped to 4.7e-4 in one step
    (dict(max_steps=110, schedule="wsd"), r"schedule wsd with max_steps=110, warmup_steps=100: the "
                                          r"default decay_steps \(22, 20% of max_steps\) would start at step 88, inside "
                                          r"the warmup.*--decay_steps 1\.\.10 .*--warmup_steps to 88 or less.*"
                                          r"--max_steps to 125 or more"),
])
def test_schedules_that_never_reach_lr_by_default_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(lr=1e-3, **settings)


def _torch_schedule(cfg: TrainConfig) -> list[float]:
    """The run's learning rates composed from torch's schedulers: LinearLR warmup, then CosineAnnealingLR
    over the rest, or a constant lr until WSD's LinearLR decay over the last decay_steps."""
    lr, min_lr, warmup, steps = cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps
    out = reference_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1 / (warmup + 1), 1.0, warmup),
                        warmup, lr) if warmup else []
    if cfg.schedule == "cosine":
        return out + reference_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, steps - warmup, min_lr),
                                   steps - warmup, lr)
    if cfg.schedule == "constant":
        return out + [lr] * (steps - warmup)
    decay = max(1, round(0.2 * steps))  # WSD's documented default: 20% of max_steps
    stable = steps - decay - warmup
    assert stable >= 0, "no such schedule: the decay overlaps the warmup"
    return out + [lr] * stable + reference_lrs(
        lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, min_lr / lr, decay), decay + 1, lr)[1:]


def test_every_accepted_default_schedule_is_torchs_warmup_then_decay():
    """Over a grid of run lengths and warmups (decay_steps left to its default), a config is accepted
    exactly when its warmup ends inside the run and WSD's default decay starts after it, and every
    accepted schedule equals the one composed from torch's schedulers."""
    for schedule in ("cosine", "wsd", "constant"):
        for steps in (11, 12, 20, 50, 99, 100, 101, 110, 124, 125, 126, 200):
            for warmup in (0, 1, 9, 10, 50, 88, 89, 99, 100, 110):
                settings = dict(lr=1.0, min_lr=0.1, max_steps=steps, warmup_steps=warmup, schedule=schedule)
                valid = warmup < steps and (schedule != "wsd" or steps - max(1, round(0.2 * steps)) >= warmup)
                if not valid:
                    with pytest.raises(ConfigError):
                        TrainConfig(**settings)
                    continue
                cfg = TrainConfig(**settings)
                ours, ref = [lr_at(s, cfg) for s in range(steps)], _torch_schedule(cfg)
                assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-12 and len(ref) == steps, settings


def test_shipped_defaults_and_smoke_runs_stay_valid():
    from lmstack.cli.train import FINETUNE_DEFAULTS

    TrainConfig()  # pretraining's defaults: 1000 steps, warmup 100
    finetune = {k: v for k, v in FINETUNE_DEFAULTS.items() if k != "max_steps"}
    for steps in range(1, 400):  # `lmstack finetune` (warmup 10) accepts any --max_steps (WSD: from 12 on)
        for schedule in ("cosine", "constant") + (("wsd",) if steps != 11 else ()):
            TrainConfig(**finetune, max_steps=steps, schedule=schedule)
    with pytest.raises(ConfigError, match=r"--decay_steps 1\.\.1 .* or raise --max_steps to 12 or more"):
        TrainConfig(**finetune, max_steps=11, schedule="wsd")
    for steps in range(1, 11):  # smoke runs: `lmstack pretrain --max_steps 1` with the default warmup of 100
        TrainConfig(max_steps=steps, schedule="wsd")
    for steps in range(50, 20001, 10):  # quickstart: calibrated to 50..20000 steps, warmup at most a fifth
        TrainConfig(max_steps=steps, warmup_steps=min(50, steps // 5))

"""`Trainer`: the one training loop for causal-LM pretraining and supervised fine-tuning.

Setup checks everything a user can get wrong (data, options, context length, the shape of a
checkpoint to resume) before any work starts. Each step accumulates micro-batches with every
loss token weighted equally across micro-batches and ranks, so k micro-batches, k ranks, or one
batch k times larger give the same update. State needed for an exact resume (optimizer, step,
data position, every RNG) is saved beside an HF model directory by `checkpoint/state.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from lmstack.checkpoint.state import (
    check_same_shape,
    incomplete_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    publish_directory,
    remove_partial_checkpoints,
    save_checkpoint,
)
from lmstack.config import ModelConfig
from lmstack.errors import CheckpointError, ConfigError, DataError, TrainingError
from lmstack.model.transformer import Transformer
from lmstack.train import distributed as D
from lmstack.train.batches import Batch, open_pretraining_data, open_sft_data
from lmstack.train.config import DEFAULT_MAX_SEQ_LEN, TrainConfig
from lmstack.train.logging import RunLogger, peak_flops, plot_losses, read_metrics, write_report
from lmstack.train.model_setup import (
    build_model,
    check_out_dir,
    check_tokenizers,
    load_tokenizer,
    model_config_for,
    resolve_precision,
)
from lmstack.train.optim import build_optimizer, lr_at
from lmstack.train.readback import PendingLoss
from lmstack.train.rng import get_rng_state, seed_everything, set_rng_state


class Trainer:
    """Train `config.model` on `config.data`; `fit()` runs to `max_steps` and returns a summary.

    `model`, `tokenizer`, `train_data` and `val_data` may be passed in (Python API, tests);
    datasets need `next_batch(batch_size)`, `state_dict()`, `load_state_dict()` and, for
    validation, `iter_eval_batches(batch_size, max_batches)`.
    """

    def __init__(self, config: TrainConfig, *, model: Transformer | None = None, tokenizer=None,
                 train_data=None, val_data=None):
        config.validate()
        self.config = c = config
        self.out_dir = Path(c.out_dir)
        check_out_dir(self.out_dir)  # before any work: a run that cannot save would be lost
        # the context first (model_config_for names a --model that is neither a directory nor a preset): a seq_len beyond it would otherwise be reported as data too short for it
        context = (model.config if model is not None else model_config_for(c, None, None, None))
        if c.seq_len is None:  # finetune's default: the model's context, at most 1024 tokens
            self.config = c = dataclasses.replace(c, seq_len=min(DEFAULT_MAX_SEQ_LEN, context.max_position_embeddings))
        if c.seq_len > context.max_position_embeddings:
            raise ConfigError(f"seq_len={c.seq_len} does not fit the model's context (max_position_embeddings="
                              f"{context.max_position_embeddings}); pass --seq_len "
                              f"{context.max_position_embeddings} or less")
        self.dist = D.setup(c.device)
        self.device = self.dist.device
        self.precision = resolve_precision(c.precision, self.device)
        if self.device.type == "cuda":  # TF32 for the few float32 matmuls left outside autocast
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        rank, world = self.dist.rank, self.dist.world_size
        if train_data is None and c.task == "pretrain":
            train_data, val_data = open_pretraining_data(c.data, c.seq_len, rank, world, c.seed, c.val_data)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(c, train_data)
        if train_data is None:
            train_data, val_data = open_sft_data(c.data, c.val_data, self.tokenizer, c.seq_len, c.pack,
                                                 rank, world, c.seed, c.skip_bad)
        self.train_data, self.val_data = train_data, val_data
        if val_data is None and self.dist.is_main:  # no val_loss, no best checkpoint, nothing to compare runs by
            hint = ("pass --val_data FILE.jsonl" if c.task == "sft" else
                    "prepare the data with --val_fraction > 0, or pass --val_data DIR")
            print(f"warning: no validation data, so this run reports no validation loss; {hint}",
                  file=sys.stderr, flush=True)
        check_tokenizers(c, self.tokenizer, train_data, val_data)
        self.model_config = model_config_for(c, model, getattr(train_data, "vocab_size", None), self.tokenizer)
        self.resume_from, state = self._find_resume()

        seed_everything(c.seed)
        raw = build_model(c, self.model_config, model, self.resume_from, self.device)
        raw.gradient_checkpointing = c.activation_checkpointing
        raw.loss_chunk_tokens = c.loss_chunk_tokens
        self.flops_per_token = raw.flops_per_token(c.seq_len)
        self.num_parameters = raw.num_parameters()
        self.raw_model = D.wrap_model(raw, c.distributed, self.dist) if c.distributed == "fsdp" else raw
        self.optimizer = build_optimizer(self.raw_model, c, self.device)
        use_compile = c.compile if c.compile is not None else self.device.type == "cuda"
        model = torch.compile(self.raw_model, mode=c.compile_mode) if use_compile else self.raw_model
        self.model = D.wrap_model(model, "ddp", self.dist) if c.distributed == "ddp" else model
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # a fused AdamW skips a step on the device (found_inf); the fp16 scaler sets found_inf itself,
        # and FSDP's sharded (DTensor) parameters do not mix with a plain found_inf tensor
        self.skip_on_device = (self.optimizer.defaults.get("fused") is True and not self.scaler.is_enabled()
                               and not D.is_fsdp(self.raw_model))
        self._pending: deque[PendingLoss] = deque()  # queued steps whose loss the host has not read
        self.step, self.tokens_seen, self.nonfinite_in_a_row, self.elapsed_s = 0, 0, 0, 0.0
        self.best_val: dict[str, float] | None = None  # lowest validation loss so far (and its step); resumed
        seed_everything(c.seed + rank)  # ranks draw different dropout masks; init above was identical
        if state is not None:
            self._load_state(state)
        self.tokens_per_step = c.batch_size * c.seq_len * c.grad_accum * world
        self.peak_flops = peak_flops(self.device, self.precision)
        self.last_val: dict[str, float] | None = None
        self.last_sample: str | None = None
        self.last_saved_step = self.step if state is not None else -1
        self.grad_norm: torch.Tensor | None = None
        self.log = RunLogger(self.out_dir, False, c.max_steps, self.step)  # replaced by fit()

    # ---- setup helpers ----------------------------------------------------------------------
    def _find_resume(self) -> tuple[Path | None, dict[str, Any] | None]:
        c = self.config
        existing = list_checkpoints(c.out_dir)
        if not c.resume:
            if existing:
                raise ConfigError(
                    f"{c.out_dir} already has checkpoints of an earlier run (newest: {existing[-1][1].name}); "
                    "pass --resume true to continue it, or choose another --out_dir"
                )
            return None, None
        path = latest_checkpoint(c.out_dir)
        skipped = incomplete_checkpoints(c.out_dir)
        if skipped and self.dist.is_main:
            print(f"warning: --resume passes over {', '.join(str(p) for p in skipped)}: no "
                  f"trainer_state/state.pt there, so no optimizer or data position to continue from; resuming from "
                  f"{path.name if path is not None else 'scratch'}; a checkpoint this run saves at the same step "
                  "replaces such a directory, so move it out of checkpoints/ to keep it",
                  file=sys.stderr, flush=True)
        if path is None:
            return None, None  # nothing to resume: a fresh start (so --resume is safe to always pass)
        from lmstack.checkpoint.hf_config import read_config

        check_same_shape(read_config(path), self.model_config, path)
        state = load_trainer_state(path)
        self._check_same_padding(state["model_config"], path)
        if state.get("world_size") != self.dist.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {state.get('world_size')} process(es) but this run has "
                f"{self.dist.world_size}; each process resumes its own data position, so use the same count"
            )
        if int(state["step"]) > c.max_steps:
            raise ConfigError(f"checkpoint {path} is at step {state['step']}, beyond --max_steps {c.max_steps}; "
                              f"raise --max_steps above {state['step']} to train further")
        return path, state

    def _check_same_padding(self, saved: dict[str, Any], path: Path) -> None:
        """The padded embedding rows are in the optimizer state's shapes, though not in config.json."""
        multiple = max(1, saved["pad_vocab_to_multiple"])
        rows = ModelConfig.from_dict(saved).padded_vocab_size
        if rows != self.model_config.padded_vocab_size:
            raise CheckpointError(
                f"checkpoint {path} pads the vocabulary to {rows} rows (pad_vocab_to_multiple={multiple}) but this "
                f"run pads it to {self.model_config.padded_vocab_size} (pad_vocab_to_multiple="
                f"{self.model_config.pad_vocab_to_multiple}); resume with --pad_vocab_to_multiple {multiple}, or "
                "use another --out_dir to start a new run"
            )

    def _load_state(self, state: dict[str, Any]) -> None:
        # the saved groups carry the old run's betas, eps and weight decay: this run's config decides them
        # (as built by build_optimizer; the lr is set every step)
        settings = [{k: group[k] for k in ("betas", "eps", "weight_decay")} for group in self.optimizer.param_groups]
        D.load_optimizer_state(self.raw_model, self.optimizer, state["optimizer"], source=self.resume_from)
        for group, wanted in zip(self.optimizer.param_groups, settings):
            group.update(wanted)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.train_data.load_state_dict(state["data"][self.dist.rank])
        set_rng_state(state["rng"][self.dist.rank], self.device)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens"])
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.best_val = state.get("best_val")

    def rng_untouched(self):
        """Run work between steps (evaluations, samples) without moving torch's RNG streams: a
        resumed run restarts from the streams saved at a checkpoint, so anything drawing from
        them between steps (sampling noise) would make it diverge from a run that never stopped."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        c, d = self.config, self.dist
        if d.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(c.out_dir)
        self.log = RunLogger(self.out_dir, d.is_main, c.max_steps, self.step, c.progress, c.tensorboard)
        if self.resume_from is not None:
            self.log.message(f"resuming from {self.resume_from} (step {self.step})")
        stats = getattr(self.train_data, "stats", None)  # SFT data reports what it kept and cut
        if stats is not None and getattr(stats, "skipped_bad", 0):
            self.log.message(f"note: skipped {stats.skipped_bad} malformed conversations (--skip_bad); first: "
                             f"{stats.bad_examples[0] if stats.bad_examples else '?'}")
        if stats is not None and getattr(stats, "truncated", 0):
            self.log.message(f"note: {stats.truncated} of {stats.examples} conversations were longer than "
                             f"seq_len={c.seq_len} and were truncated ({stats.without_trained_tokens} lost every "
                             "assistant token); raise --seq_len to keep them whole")
        self.model.train()
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
        try:
            while self.step < c.max_steps:
                t0 = time.perf_counter()
                self.launch_step()
                log_now = self.step % c.log_every == 0 or self.step == c.max_steps
                periodic = self._periodic_due()
                # Usually only the previous step's loss is read (done by now: no wait for the GPU);
                # logs, evals and checkpoints need every step so far, and that wait is training time.
                loss = self.settle(keep=0 if log_now or any(periodic) else 1)
                self.elapsed_s += time.perf_counter() - t0
                window_tokens += self.tokens_per_step
                window_steps += 1
                if log_now:
                    dt = time.perf_counter() - window_start
                    self._log_train(loss, window_tokens / dt, dt / window_steps)
                    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
                if any(periodic):
                    paused = time.perf_counter()
                    self._periodic(*periodic)
                    window_start += time.perf_counter() - paused  # evals and saves do not count against tokens/s
            self.settle()
            return self._finish()
        finally:
            self.log.close()

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns its mean loss (nan if skipped).

        Waits for the step to finish (tests, notebooks); `fit` runs `launch_step` and reads each
        loss one step late instead, so the host never waits for the GPU between steps.
        """
        self.launch_step()
        return self.settle()

    def launch_step(self) -> None:
        """Queue one optimizer step. A non-finite loss or gradient norm skips the update: on the device
        when the optimizer is fused (AdamW's `found_inf`, no host sync), else here after reading them
        (fp16: the GradScaler skips overflowing gradients itself and lowers its scale). `settle` does
        the bookkeeping (warning, count, stopping) once the values reach the host."""
        c = self.config
        lr = lr_at(self.step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [Batch.of(self.train_data.next_batch(c.batch_size)) for _ in range(c.grad_accum)]
        mean_loss = self.accumulate_gradients(batches)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        if self.skip_on_device:
            norm = self.clip_gradients()
            self._pending.append(PendingLoss(self.step, lr, mean_loss, norm))
            good = torch.isfinite(mean_loss) & torch.isfinite(norm)  # a NaN/inf norm: clipping made the grads NaN
            self.optimizer_step(found_inf=(~good).float())
        elif self.scaler.is_enabled():  # fp16 (host path)
            if not math.isfinite(mean_loss.item()):
                self._pending.append(PendingLoss(self.step, lr, mean_loss))
                self.optimizer.zero_grad(set_to_none=True)
                return
            # gradients that overflow float16 at this loss scale: the scaler skips the step (its found_inf,
            # from unscale_) and halves the scale; settle() tells calibration from a bad gradient
            scale = self.scaler.get_scale()
            self.scaler.unscale_(self.optimizer)
            pending = PendingLoss(self.step, lr, mean_loss, self.clip_gradients(), loss_scale=scale)
            self._pending.append(pending)
            self.optimizer_step()
        else:
            pending = PendingLoss(self.step, lr, mean_loss, self.clip_gradients())
            self._pending.append(pending)
            if pending.finite():
                self.optimizer_step()
            else:
                self.optimizer.zero_grad(set_to_none=True)

    def settle(self, keep: int = 0) -> float:
        """Read back all but the newest `keep` queued steps, counting those skipped for a non-finite
        loss or gradient norm (and stopping after max_nonfinite_steps in a row); returns the last loss
        read (nan if none, or if that step was skipped: its loss is in its own "skipped" record, and the
        train loss reported for the step must be that of an update that happened).

        In `fit` the stop comes one step after the streak's last bad step: that next step has
        already run (and, if it was finite, updated the weights in memory); nothing is saved in
        between, so the last good checkpoint named in the error is unaffected."""
        loss = math.nan
        while len(self._pending) > keep:
            pending = self._pending.popleft()
            loss = pending.value()
            if pending.finite():
                self.nonfinite_in_a_row = 0
            elif math.isfinite(loss) and pending.loss_scale is not None and pending.loss_scale > 1:
                # fp16: the GradScaler's calibration (gradients too large for float16 at this scale);
                # neither good nor counted
                self.log.message(f"note: step {pending.step}: fp16 gradients overflowed at loss scale "
                                 f"{pending.loss_scale:g}; the gradient scaler skipped the update and halved the scale")
                self.log.log({"step": pending.step, "skipped": True, "loss_scale": pending.loss_scale,
                              "lr": pending.lr})
            else:
                self._skipped(pending.step, loss, pending.grad_norm(), pending.lr)
                loss = math.nan
        return loss

    def accumulate_gradients(self, batches: list[Batch]) -> torch.Tensor:
        """Forward and backward over micro-batches; the gradient is that of the mean loss over every
        loss token of the step (all micro-batches, all ranks). Returns that mean loss (0-d, on the
        device: reading it is left to the caller, since it waits for the GPU)."""
        d = self.dist
        batches = [b.to(self.device) for b in batches]
        for b in batches:
            self._check_batch(b)
        counts = [b.num_targets() for b in batches]
        total = d.all_reduce_sum(torch.stack(counts).sum().float()).clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            with D.gradient_sync(self.model, self.raw_model, i == len(batches) - 1), self.autocast():
                out = self.model(**batch.model_inputs())
                # this micro-batch's summed token losses over all loss tokens of the step; times
                # world_size because DDP and FSDP average gradients over ranks
                loss = out.ce_loss * (counts[i] * d.world_size / total)
                if out.aux_loss is not None:
                    loss = loss + self.model_config.router_aux_loss_coef * out.aux_loss / len(batches)
            self.scaler.scale(loss).backward()
            loss_sum += out.ce_loss.detach().float() * counts[i]
        return d.all_reduce_sum(loss_sum) / total

    def clip_gradients(self) -> torch.Tensor:
        """The global gradient norm (0-d, on the device), gradients clipped to grad_clip when it is > 0.
        Computed without clipping too: a non-finite norm must skip the step either way. (Call after the
        fp16 scaler's unscale_.)"""
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.grad_clip)
        elif hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: the norm alone, no rescaling pass
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.raw_model.parameters() if p.grad is not None])
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), math.inf)
        self.grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return self.grad_norm

    def optimizer_step(self, found_inf: torch.Tensor | None = None) -> None:
        """Step (the fp16 scaler's step and update), zero the gradients; after `clip_gradients`.
        `found_inf` (a 0-d float tensor, 1.0 = skip) makes the fused AdamW leave weights, moments
        and step count untouched."""
        if found_inf is not None:
            self.optimizer.found_inf = found_inf
        try:
            self.scaler.step(self.optimizer)
        finally:
            if found_inf is not None:
                del self.optimizer.found_inf
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _skipped(self, step: int, loss: float, grad_norm: float | None, lr: float) -> None:
        c = self.config
        self.nonfinite_in_a_row += 1
        what = (f"loss is {loss}" if not math.isfinite(loss) else
                f"gradient norm is {grad_norm} (loss {loss:.4f})")
        self.log.message(f"warning: step {step}: {what}; skipped the update "
                         f"({self.nonfinite_in_a_row} in a row, stopping at {c.max_nonfinite_steps})")
        self.log.log({"step": step, "loss": _finite_or_none(loss), "grad_norm": _finite_or_none(grad_norm),
                      "skipped": True, "lr": lr})
        if self.nonfinite_in_a_row >= c.max_nonfinite_steps:
            kept = latest_checkpoint(c.out_dir)
            raise TrainingError(
                f"{self.nonfinite_in_a_row} non-finite steps in a row (loss or gradient norm; last at step {step}); "
                f"stopped. The last good checkpoint is {kept or 'none (no checkpoint was written yet)'}. Lower --lr, "
                "raise --warmup_steps or use --precision bf16/fp32, then --resume true"
            )

    def _check_batch(self, batch: Batch) -> None:
        if batch.input_ids.shape[1] > self.model_config.max_position_embeddings:
            raise DataError(
                f"a batch of {batch.input_ids.shape[1]} tokens does not fit the model's context of "
                f"{self.model_config.max_position_embeddings}; lower --seq_len"
            )

    def _log_train(self, loss: float, tokens_per_s: float, step_s: float) -> None:
        record: dict[str, Any] = {"step": self.step, "loss": loss if math.isfinite(loss) else None,
                                  "lr": lr_at(self.step - 1, self.config), "tokens": self.tokens_seen,
                                  "tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 5)}
        if self.grad_norm is not None:  # a skipped step's norm is not finite: logged as null
            grad_norm = float(self.grad_norm)
            record["grad_norm"] = grad_norm if math.isfinite(grad_norm) else None
        postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if self.peak_flops:
            record["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.dist.world_size)
            postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
        self.log.log(record)
        self.log.progress(self.step, **postfix)

    def _periodic_due(self) -> tuple[bool, bool, bool]:
        """(eval, sample, save) due after this step; the last step's are left to `_finish`."""
        c, last = self.config, self.step == self.config.max_steps
        return tuple(bool(every) and self.step % every == 0 and not last
                     for every in (c.eval_every, c.sample_every, c.save_every))

    def _periodic(self, evaluate: bool, sample: bool, save: bool) -> None:
        self.settle()  # a checkpoint must know whether the steps before it were good
        if evaluate:
            self.evaluate_and_log()
        if save and not self.nonfinite_in_a_row:
            self.save_checkpoint()  # before the sample: work is kept whatever sampling does
        if sample:
            self.sample_and_log()

    def _finish(self) -> dict[str, Any]:
        c = self.config
        if self.val_data is not None and (self.last_val is None or self.last_val["step"] != self.step):
            self.evaluate_and_log()
        if self.last_saved_step != self.step:
            self.save_checkpoint()
        model_dir = self.export_model(self.out_dir / "model")
        if self.tokenizer is not None:
            self.sample_and_log()  # after the model is written: work is kept whatever sampling does
        summary = self.summary(model_dir)
        if self.dist.is_main:
            records = read_metrics(self.out_dir / "metrics.jsonl")
            plot_losses(records, self.out_dir / "loss.png", title=f"{c.model} ({c.task})")
            write_report(self.out_dir / "report.md", summary, self.last_sample)
        self.dist.barrier()
        return summary

    # ---- evaluation and samples -------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Validation loss (mean over loss tokens) and perplexity, or None without validation data."""
        if self.val_data is None:
            return None
        c, d = self.config, self.dist
        batches = list(self.val_data.iter_eval_batches(c.batch_size, max_batches=c.eval_batches))
        n = d.all_reduce_min(len(batches))
        if n == 0:
            return None
        self.model.eval()
        total_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        total_count = torch.zeros((), device=self.device, dtype=torch.float64)
        try:
            for raw in batches[:n]:
                batch = Batch.of(raw).to(self.device)
                with self.autocast():
                    out = self.model(**batch.model_inputs())
                count = batch.num_targets()
                total_loss += out.ce_loss.double() * count
                total_count += count
        finally:
            self.model.train()
        d.all_reduce_sum(total_loss)
        d.all_reduce_sum(total_count)
        loss = (total_loss / total_count.clamp(min=1)).item()
        return {"step": self.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def evaluate_and_log(self) -> None:
        with self.rng_untouched():
            result = self.evaluate()
        if result is None:
            return
        self.last_val = result
        if self.best_val is None or result["val_loss"] < self.best_val["val_loss"]:
            self.best_val = result
        self.log.log(result)
        self.log.message(f"step {self.step}: val loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")

    def sample_and_log(self) -> None:
        if self.tokenizer is None or not (self.dist.is_main or D.is_fsdp(self.raw_model)):
            return  # under FSDP every rank runs the forward (parameters are sharded); else rank 0 alone
        from lmstack.infer.decoder import Decoder
        from lmstack.infer.generate import generate
        from lmstack.infer.params import GenerationConfig

        c = self.config
        room = self.model_config.max_position_embeddings - len(self.tokenizer.encode(c.sample_prompt, True))
        if room < 1:
            return  # the prompt alone fills the context
        # eager decoding with its own seeded generator; the sampler also draws from torch's global one,
        # so the training streams are forked around it
        options = GenerationConfig(temperature=0.8, top_k=50, max_new_tokens=min(c.sample_tokens, room), seed=c.seed)
        self.raw_model.eval()  # no dropout; float32 weights, so no autocast (the KV cache is float32 too)
        try:
            with self.rng_untouched():
                out = generate(self.raw_model, c.sample_prompt, options, self.tokenizer,
                               decoder=Decoder(self.raw_model))
        finally:
            self.raw_model.train()
        text = c.sample_prompt + (out[0].outputs[0].text or "")
        self.last_sample = text
        self.log.message(f"step {self.step} sample: {text!r}")
        self.log.log({"step": self.step, "sample": text})

    # ---- checkpoints ------------------------------------------------------------------------
    def _model_writer(self):
        """A function writing the HF directory (rank 0), after gathering FSDP shards on every rank."""
        if not D.is_fsdp(self.raw_model):
            model = self.raw_model
        else:
            full = D.full_model_state(self.raw_model, self.dist)
            model = None
            if self.dist.is_main:
                with torch.device("meta"):
                    model = Transformer(self.model_config)
                model.load_state_dict(full, assign=True)
                model.tie_weights()
        return lambda directory: model.save_pretrained(directory, tokenizer=self.tokenizer)

    def save_checkpoint(self) -> Path | None:
        """Write out_dir/checkpoints/step-N atomically (collective: every rank must call it)."""
        c, d = self.config, self.dist
        write_model = self._model_writer()
        optimizer = D.full_optimizer_state(self.raw_model, self.optimizer)
        data_states = d.gather_objects(self.train_data.state_dict())
        rng_states = d.gather_objects(get_rng_state(self.device))
        path = None
        if d.is_main:
            import yaml

            state = {"step": self.step, "tokens": self.tokens_seen, "optimizer": optimizer,
                     "scaler": self.scaler.state_dict(), "data": data_states, "rng": rng_states,
                     "world_size": d.world_size, "model_config": self.model_config.to_dict(),
                     "train_config": c.to_dict(), "nonfinite_in_a_row": self.nonfinite_in_a_row,
                     "elapsed_s": self.elapsed_s, "best_val": self.best_val}
            path = save_checkpoint(c.out_dir, self.step, write_model, state,
                                   yaml.safe_dump(c.to_dict(), sort_keys=False), c.keep_last)
        self.last_saved_step = self.step
        d.barrier()
        return path

    def export_model(self, directory: Path) -> Path:
        """The trained model as an HF directory (with the tokenizer), replacing an older export atomically."""
        write_model = self._model_writer()
        if self.dist.is_main:
            tmp = directory.with_name(f".tmp-{directory.name}")
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            write_model(tmp)
            publish_directory(tmp, directory)
        self.dist.barrier()
        return directory

    def summary(self, model_dir: Path) -> dict[str, Any]:
        c = self.config
        records = read_metrics(self.out_dir / "metrics.jsonl") if self.dist.is_main else []
        losses = [r["loss"] for r in records if r.get("loss") is not None and not r.get("skipped")]
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        out: dict[str, Any] = {
            "model": c.model, "task": c.task, "parameters": f"{self.num_parameters / 1e6:.2f}M",
            "steps": self.step, "tokens": self.tokens_seen, "train time (s)": round(self.elapsed_s, 1),
            "devices": f"{self.dist.world_size} x {self.device.type}", "precision": self.precision,
            "final train loss": losses[-1] if losses else None,
            "tokens/s (median)": sorted(speeds)[len(speeds) // 2] if speeds else None,
        }
        if self.peak_flops and speeds:
            out["MFU"] = f"{100 * self.flops_per_token * out['tokens/s (median)'] / (self.peak_flops * self.dist.world_size):.1f}%"
        if self.last_val is not None:
            out["val loss"] = self.last_val["val_loss"]
            out["val perplexity"] = self.last_val["val_ppl"]
            out["best val loss"] = self.best_val["val_loss"]
            out["best val step"] = self.best_val["step"]
        out["model directory"] = str(model_dir)
        return out

    def close(self) -> None:
        self.dist.close()


def _finite_or_none(value: float | None) -> float | None:
    """A metric for metrics.jsonl: JSON has no nan or inf, so those are written as null."""
    return value if value is not None and math.isfinite(value) else None

"""`TrainConfig`: every option of a training run, one dataclass for pretraining and fine-tuning.

Each field is also a CLI flag and a key of `--config file.yaml` (the CLI builds its commands
from this dataclass), so a run is fully described by one YAML file that is saved beside every
checkpoint. `validate()` checks ranges before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmstack.errors import ConfigError

DEFAULT_MAX_SEQ_LEN = 1024  # seq_len=None: the model's context, capped here (SFT conversations are short)
SMOKE_RUN_STEPS = 10  # runs this short are smoke tests: a warmup as long as the run is not refused


@dataclass
class TrainConfig:
    """Options of a training run (pretraining or full fine-tuning).

    Args:
        model: A preset name (fresh weights, e.g. tiny-llama, gpt2, llama-3.2-1b) or a Hugging Face model directory (continued pretraining / fine-tuning).
        data: Pretraining: a directory of token shards from `lmstack data prepare`. Fine-tuning: a chat JSONL file.
        out_dir: Where checkpoints, metrics.jsonl, loss.png, report.md and the final model (out_dir/model) go.
        task: pretrain (next-token loss on every token) or sft (loss on assistant tokens only).
        model_overrides: ModelConfig fields to change on a preset, e.g. {num_layers: 4, hidden_size: 256}.
        val_data: Validation data: pretraining, a prepared directory (default: the data's val split); fine-tuning, a chat JSONL file.
        tokenizer: Directory with tokenizer.json; default: the data directory's, then the model directory's.
        seq_len: Tokens per training sequence (must fit the model's max_position_embeddings); null: the model's context, at most 1024.
        batch_size: Sequences per micro-batch on each device.
        grad_accum: Micro-batches accumulated per optimizer step.
        max_steps: Optimizer steps to train for.
        lr: Peak learning rate.
        min_lr: Learning rate at the end of the decay.
        schedule: cosine (warmup, cosine decay), wsd (warmup, stable, linear decay) or constant (after warmup).
        warmup_steps: Linear warmup steps; must be below max_steps (runs of more than 10 steps).
        decay_steps: Cosine: step where the decay reaches min_lr (default: max_steps; at least warmup_steps). WSD: length of the final decay (default: 20% of max_steps; at most max_steps - warmup_steps, the default included).
        weight_decay: AdamW weight decay of matrices (norms, biases and embeddings are never decayed unless decay_embeddings).
        decay_embeddings: Also decay embedding tables (nanoGPT does; used to reproduce it).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        adam_eps: AdamW epsilon.
        grad_clip: Clip the global gradient norm to this value (0 disables).
        dropout: Dropout probability; default: the model's own (0 for presets).
        precision: auto (bf16 on GPUs that have it, fp16 with a gradient scaler on older GPUs, fp32 on CPU), bf16, fp16 or fp32.
        compile: torch.compile the model; default: on for CUDA, off on CPU.
        compile_mode: torch.compile mode: default, max-autotune-no-cudagraphs (slower to compile, may run faster), reduce-overhead or max-autotune.
        activation_checkpointing: Recompute activations in the backward pass to save memory.
        loss_chunk_tokens: Compute the LM head and loss this many tokens at a time, gradients included (0: all at once). Saves the (tokens x vocab) logits memory, the largest activation with big vocabularies; not with FSDP.
        pad_vocab_to_multiple: Pad the embedding rows to a multiple of this for speed (outputs and saved files unchanged).
        distributed: How to split work under torchrun: ddp (replicate) or fsdp (FSDP2, shard parameters).
        device: auto, cpu, cuda or cuda:N (under torchrun each process takes cuda:LOCAL_RANK).
        seed: Random seed (initialisation, data order, dropout), in [0, 2**32).
        eval_every: Evaluate validation loss every this many steps (0: only at the end).
        eval_batches: Validation batches per evaluation.
        sample_every: Print a sample generation every this many steps (0: only at the end).
        sample_prompt: The fixed prompt of sample generations.
        sample_tokens: Tokens generated per sample.
        save_every: Write a checkpoint every this many steps (0: only at the end).
        keep_last: Keep this many newest checkpoints.
        resume: Continue from the newest complete checkpoint in out_dir/checkpoints.
        max_nonfinite_steps: Stop after this many steps in a row with a non-finite loss or gradient norm (each one skips its update).
        log_every: Write metrics.jsonl and refresh the progress bar every this many steps.
        pack: Fine-tuning: pack several conversations into each sequence.
        skip_bad: Fine-tuning: skip malformed conversations (counted in the log) instead of stopping.
        progress: Show a progress bar.
        tensorboard: Also log to out_dir/tensorboard when tensorboard is installed.
    """

    model: str = "tiny-llama"
    data: str | None = None
    out_dir: str = "runs/train"
    task: Literal["pretrain", "sft"] = "pretrain"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    val_data: str | None = None
    tokenizer: str | None = None
    seq_len: int | None = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int | None = None
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    dropout: float | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool | None = None
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 0
    pad_vocab_to_multiple: int = 64
    distributed: Literal["ddp", "fsdp"] = "ddp"
    device: str = "auto"
    seed: int = 0
    eval_every: int = 250
    eval_batches: int = 20
    sample_every: int = 0
    sample_prompt: str = "The"
    sample_tokens: int = 48
    save_every: int = 500
    keep_last: int = 2
    resume: bool = False
    max_nonfinite_steps: int = 5
    log_every: int = 10
    pack: bool = True
    skip_bad: bool = False
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """Each option has its declared type, or a ConfigError names it. (The CLI converts its flags;
        Python and YAML callers pass values as they are.) Float options given as text become floats:
        YAML reads `lr: 1e-3` (no dot) as the string '1e-3'; a quoted 'false' is not a boolean."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type.split(" | ")[0]
            if value is None and f.type.endswith("| None"):
                continue
            if kind == "str" and isinstance(value, os.PathLike):
                value = os.fspath(value)  # paths given as Path objects are stored as text (saved in YAML)
                setattr(self, f.name, value)
            if kind == "float" and isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{f.name} must be a number, got {value!r}") from None
            ok = {"float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "bool": isinstance(value, bool),
                  "str": isinstance(value, str)}.get(kind, True)
            if not ok:
                what = {"float": "a finite number", "int": "an integer", "bool": "true or false",
                        "str": "a string"}[kind]
                raise ConfigError(f"{f.name} must be {what}, got {value!r}")
            if kind == "float":
                setattr(self, f.name, float(value))

    # ---- checks -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first option that is out of range."""
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "pad_vocab_to_multiple", "keep_last",
                    "max_nonfinite_steps", "log_every", "eval_batches", "sample_tokens")
        for name in positive:
            value = getattr(self, name)
            if name == "seq_len" and value is None:  # resolved from the model's context by the Trainer
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "sample_every", "save_every", "loss_chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "adam_eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} is above lr={self.lr}; the schedule decays from lr to min_lr")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ConfigError(f"decay_steps must be positive or unset, got {self.decay_steps!r}")
        self._check_decay_steps()
        if not 0 <= self.seed < 2**32:  # NumPy's generators (data order) take no other seeds
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        choices = {"task": ("pretrain", "sft"), "schedule": ("cosine", "wsd", "constant"),
                   "precision": ("auto", "bf16", "fp16", "fp32"), "distributed": ("ddp", "fsdp"),
                   "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.loss_chunk_tokens and self.distributed == "fsdp":
            raise ConfigError("loss_chunk_tokens needs the whole LM head weight, which FSDP shards; "
                              "use --distributed ddp or --loss_chunk_tokens 0")
        if not isinstance(self.sample_prompt, str) or not self.sample_prompt:
            raise ConfigError(f"sample_prompt must be some text (samples continue it), got {self.sample_prompt!r}; "
                              "leave it unset for the default 'The'")
        if not isinstance(self.model_overrides, dict):
            raise ConfigError(f"model_overrides must be a mapping of ModelConfig fields, got {self.model_overrides!r}")

    def wsd_decay_steps(self) -> int:
        """Length of WSD's final decay: decay_steps, default 20% of max_steps (at least 1)."""
        return self.decay_steps or max(1, round(0.2 * self.max_steps))

    def _wsd_min_steps(self) -> int:
        """The fewest max_steps whose default WSD decay starts at or after the warmup ends."""
        steps = self.max_steps
        while steps - max(1, round(0.2 * steps)) < self.warmup_steps:
            steps += 1
        return steps

    def _check_decay_steps(self) -> None:
        """A WSD decay that overlaps the warmup (or outlasts the run), a cosine that ends before the
        warmup does, or a warmup as long as the run never reaches --lr: almost surely a mistake, and a
        silent one. Runs of at most SMOKE_RUN_STEPS steps (smoke tests) are exempt from the checks on
        the defaults (not from those on an explicit decay_steps)."""
        d, warmup, steps = self.decay_steps, self.warmup_steps, self.max_steps
        if self.schedule == "wsd" and d is not None and d > steps - warmup:
            allowed = f"1..{steps - warmup} (max_steps - warmup_steps)" if steps > warmup else "none (raise max_steps)"
            raise ConfigError(f"decay_steps={d} with schedule wsd and max_steps={steps}, warmup_steps={warmup}: the "
                              f"decay would overlap the warmup and never reach lr; allowed: {allowed}")
        if self.schedule == "cosine" and d is not None and d < warmup:
            raise ConfigError(f"decay_steps={d} with schedule cosine ends before warmup_steps={warmup}, so lr is "
                              f"never reached; decay_steps must be >= warmup_steps ({warmup}) or unset (max_steps)")
        if steps <= SMOKE_RUN_STEPS:
            return
        if warmup >= steps:
            raise ConfigError(
                f"warmup_steps={warmup} is not below max_steps={steps}: the whole run would be warmup and "
                f"the learning rate would never reach lr={self.lr:g} (nor decay); pass --warmup_steps "
                f"{max(1, steps // 10)} (10% of max_steps) or any value below {steps}, or raise --max_steps above {warmup}")
        decay = self.wsd_decay_steps()
        if self.schedule == "wsd" and decay > steps - warmup:  # only the default decay gets here
            raise ConfigError(
                f"schedule wsd with max_steps={steps}, warmup_steps={warmup}: the default decay_steps "
                f"({decay}, 20% of max_steps) would start at step {steps - decay}, inside the warmup, so lr is never "
                f"reached; pass --decay_steps 1..{steps - warmup} (max_steps - warmup_steps), lower --warmup_steps to "
                f"{steps - decay} or less, or raise --max_steps to {self._wsd_min_steps()} or more")

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; an unknown key is a ConfigError listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known options: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of training options, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

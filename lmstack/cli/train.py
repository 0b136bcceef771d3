"""`lmstack pretrain` and `lmstack finetune --method full`: flags generated from `TrainConfig`.

Every `TrainConfig` field is a flag and a `--config file.yaml` key, with the field's help text
and a per-command default, so the dataclass is the one place an option is declared. The same
command runs under `torchrun --nproc_per_node N` for DDP/FSDP2 (only rank 0 prints).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Literal

from lmstack.errors import ConfigError
from lmstack.train.config import TrainConfig

PRETRAIN_DEFAULTS: dict[str, Any] = {"out_dir": "runs/pretrain"}
FINETUNE_DEFAULTS: dict[str, Any] = {
    "out_dir": "runs/finetune", "lr": 2e-5, "min_lr": 2e-6, "warmup_steps": 10, "weight_decay": 0.0,
    "max_steps": 200, "seq_len": None, "batch_size": 4, "eval_every": 50, "save_every": 100,
    "sample_prompt": "Hello",
}


def _field_docs() -> dict[str, str]:
    """Field name -> help text, from TrainConfig's Google-style docstring."""
    docs = {}
    for line in (TrainConfig.__doc__ or "").splitlines():
        m = re.match(r"\s+(\w+): (.*)", line)
        if m:
            docs[m.group(1)] = m.group(2)
    return docs


def _command(name: str, summary: str, task: str, defaults: dict[str, Any], extra: list[inspect.Parameter],
             extra_docs: dict[str, str]):
    """A function whose signature is TrainConfig's fields, for jsonargparse.

    `task` is fixed by the command but still accepted when it matches, so the train_config.yaml
    saved beside every checkpoint can be passed back with --config to the command that wrote it."""
    docs = {**_field_docs(), **extra_docs,
            "task": f"Always {task} for this command (a saved train_config.yaml names it)."}
    params, defaults = list(extra), {**defaults, "task": task}
    for f in dataclasses.fields(TrainConfig):
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        annotation = str if f.name == "task" else f.type  # any text: a mismatch gets the message below
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    extra_names = {p.name for p in extra}

    def command(**kwargs: Any) -> None:
        options = {k: v for k, v in kwargs.items() if k not in extra_names}
        if options["task"] != task:
            other = {"pretrain": "lmstack pretrain", "sft": "lmstack finetune"}.get(options["task"])
            raise ConfigError(f"task={options['task']!r} but `lmstack {name}` trains task {task!r}; "
                              + (f"run this config with `{other}`" if other else "drop task from the config"))
        run_training(TrainConfig(**options))

    command.__name__ = command.__qualname__ = name
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    arg_lines = "\n".join(f"        {p.name}: {docs.get(p.name, '')}" for p in params)
    command.__doc__ = f"{summary}\n\n    Args:\n{arg_lines}\n"
    return command


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Build the Trainer (all checks happen here, before any work), train, print where things went."""
    from lmstack.train import Trainer
    from lmstack.train.logging import format_value

    trainer = Trainer(config)
    try:
        summary = trainer.fit()
        if trainer.dist.is_main:
            width = max(len(k) for k in summary)
            for key, value in summary.items():
                if value is not None:
                    print(f"{key:<{width}}  {format_value(value)}")
            print(f"report: {config.out_dir}/report.md   loss curve: {config.out_dir}/loss.png")
        return summary
    finally:
        trainer.close()


pretrain = _command(
    "pretrain",
    "Pretrain a causal LM on token shards (a preset with fresh weights, or continue an HF model).",
    "pretrain", PRETRAIN_DEFAULTS, [], {},
)

finetune = _command(
    "finetune",
    "Fine-tune an HF model on chat data (JSONL of conversations); the loss covers assistant turns only.",
    "sft", FINETUNE_DEFAULTS,
    [inspect.Parameter("method", inspect.Parameter.KEYWORD_ONLY, default="full", annotation=Literal["full"])],
    {"method": "How to fine-tune: full (every weight is trained)."},
)

"""`lmstack quickstart`: train a small code model from scratch on this machine, end to end."""

from __future__ import annotations


def quickstart(out_dir: str = "runs/quickstart", device: str = "auto", minutes: float | None = None,
               seed: int = 0, progress: bool = True) -> None:
    """Train a small code model from scratch on this machine and show what it learned.

    Builds the stdlib corpus, trains a BPE tokenizer, prepares shards, pretrains a small Llama-style
    model sized for the hardware, compares its validation loss with a unigram baseline and prints
    completions of code prompts.

    Args:
        out_dir: Where everything goes (model/, data/, tokenizer/, report.md, loss.png); reused if an earlier quickstart made it.
        device: auto, cpu or cuda.
        minutes: Training time budget (default: 5 on a CPU, 6 on a GPU); a CPU run calibrates its step count to it.
        seed: Random seed.
        progress: Show progress bars.
    """
    from lmstack.train.quickstart import run_quickstart

    run_quickstart(out_dir=out_dir, device=device, minutes=minutes, seed=seed, progress=progress)

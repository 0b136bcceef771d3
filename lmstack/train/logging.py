"""What a run shows and leaves behind: progress bar, metrics.jsonl, TensorBoard, loss plot, report.md.

Only rank 0 logs. `metrics.jsonl` has one JSON object per logged step or evaluation; on resume it is
cut back to the checkpoint's step so the file always describes one consistent run. MFU uses the
model's FLOPs per token and the accelerator's published dense peak (bf16/fp16 tensor cores).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

# Dense bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' data sheets (no sparsity).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12),
    ("V100", 125e12), ("T4", 65e12),
)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s for this precision, or None when unknown (CPU, fp32, other GPUs)."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return records


class RunLogger:
    """Rank 0's view of a run; on other ranks every method does nothing."""

    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= start_step] if start_step else []
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.metrics_path, "a")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step or None)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must have `step`) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def progress(self, step: int, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self._file.close()


def plot_losses(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Train and validation loss against step as a PNG (None when there is nothing to plot)."""
    # a skipped step's record holds "loss": null, or the finite loss of a step skipped for its gradient norm
    train = [(r["step"], r["loss"]) for r in records
             if r.get("loss") is not None and math.isfinite(r["loss"]) and not r.get("skipped")]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def format_value(value: Any) -> str:
    """Numbers for people: 4 significant digits, thousands separators instead of exponents."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_report(path: str | Path, summary: dict[str, Any], sample: str | None = None) -> Path:
    """A short markdown summary of the run: what was trained, how fast, how well."""
    lines = ["# Training report", "", "| | |", "|---|---|"]
    for key, value in summary.items():
        if value is not None:
            lines.append(f"| {key} | {format_value(value)} |")
    if Path(path).with_name("loss.png").is_file():
        lines += ["", "![loss curve](loss.png)"]
    if sample is not None:
        lines += ["", "## Sample", "", "```", sample, "```"]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)

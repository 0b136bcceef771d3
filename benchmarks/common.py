"""Shared helpers for benchmark scripts: hardware description, timing, appending to RESULTS.md.

Benchmarks compare implementations side by side in one process and report ratios, because
the machines are shared and absolute numbers drift from run to run.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def hardware() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, table: str, notes: str = "") -> None:
    """Append one dated section (hardware, exact command, table) to benchmarks/RESULTS.md."""
    today = datetime.date.today().isoformat()
    section = (f"\n### {title} — {today}\n\n- Hardware: {hardware()}\n- Command: `{command_line()}`\n"
               + (f"- Notes: {notes}\n" if notes else "") + f"\n{table}\n")
    with open(RESULTS, "a") as f:
        f.write(section)
    print(section)


def report(title: str, table: str, notes: str, no_record: bool) -> None:
    """Print the table (--no-record) or append it, dated, to RESULTS.md."""
    if no_record:
        print(table + "\n\n" + notes)
    else:
        append_results(title, table, notes)


def throughput_table(title: str, times: dict[str, list[float]], tokens_per_step: int, flops_per_token: float,
                     peak_flops: float | None) -> str:
    """Median ms/step, tokens/s and MFU per implementation, then lmstack's ratio to transformers."""
    rows = []
    for name, ts in times.items():
        tps = tokens_per_step / median(ts)
        mfu = f"{100 * tps * flops_per_token / peak_flops:.1f}%" if peak_flops else "n/a (CPU)"
        rows.append([name, f"{median(ts) * 1000:.1f}", f"{tps:,.0f}", mfu])
    ratio = median(times["transformers"]) / median(times["lmstack"])
    rows.append(["ratio lmstack/transformers", "", f"{ratio:.2f}x", ""])
    return markdown_table([title, "ms/step (median)", "tokens/s", "MFU"], rows)

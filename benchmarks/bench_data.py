"""Tokenization throughput of `lmstack data prepare` against `tokenizers`' own encode_batch.

Both run in one process on the same text (the running Python's stdlib, or --input) with all
CPU cores: the library through its Rayon thread pool, `data prepare` through its worker
processes, end to end (reading files, NFC, control characters, hashing, dedup, shards).
Each is run --repeats times in back-to-back pairs; ratios are medians of the paired ratios, both
wall-clock and per core (MB per CPU-second, which a shared machine's other jobs disturb less).

    python benchmarks/bench_data.py                      # trains an 8192-token BPE on the stdlib first
    python benchmarks/bench_data.py --tokenizer DIR --repeats 3 --record
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# lmstack is imported inside main(): spawned workers re-import this script, and should not pay for it.


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def clocks() -> tuple[float, float]:
    """Wall time and CPU time of this process plus its finished (joined) worker processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def elapsed(wall: float, cpu: float) -> tuple[float, float]:
    now_wall, now_cpu = clocks()
    return now_wall - wall, now_cpu - cpu


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="stdlib", help="corpus (default: the stdlib .py files)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train one on the corpus)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="prepare workers (0 = all cores)")
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    from lmstack.data import PrepareConfig, prepare
    from lmstack.data.sources import iter_documents
    from lmstack.tokenizer import Tokenizer

    texts = [d.text for d in iter_documents([args.input])]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        if args.tokenizer is None:
            started = time.perf_counter()
            Tokenizer.train(texts, args.vocab_size).save(work / "tok")
            print(f"trained a {args.vocab_size}-token BPE on the corpus in {time.perf_counter() - started:.1f}s")
            args.tokenizer = str(work / "tok")
        backend = Tokenizer.load(args.tokenizer).backend
        raw_runs, prep_runs, tokens = [], [], 0

        def run_raw():
            nonlocal tokens
            wall, cpu = clocks()
            encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
            raw_runs.append(elapsed(wall, cpu))
            tokens = sum(len(e.ids) for e in encodings)

        def run_prepare(r):
            out = work / f"out{r}"
            wall, cpu = clocks()
            report = prepare(PrepareConfig([args.input], args.tokenizer, str(out), workers=args.workers,
                                           progress=False))
            prep_runs.append(elapsed(wall, cpu))
            shutil.rmtree(out)
            return report

        for r in range(args.repeats):  # alternate which goes first, so drifting load hits both alike
            if r % 2:
                report = run_prepare(r)
                run_raw()
            else:
                run_raw()
                report = run_prepare(r)
            print(f"run {r + 1}: encode_batch {raw_runs[-1][0]:.1f}s wall / {raw_runs[-1][1]:.1f} CPU-s, "
                  f"data prepare {prep_runs[-1][0]:.1f}s wall / {prep_runs[-1][1]:.1f} CPU-s")
        mb = nbytes / 1e6
        wall_ratios = sorted(r[0] / p[0] for r, p in zip(raw_runs, prep_runs))
        core_ratios = sorted(r[1] / p[1] for r, p in zip(raw_runs, prep_runs))
        print("paired wall-clock ratios (prepare / raw speed): " + ", ".join(f"{x:.2f}" for x in wall_ratios))
        print("paired per-core ratios (MB per CPU-second):     " + ", ".join(f"{x:.2f}" for x in core_ratios))
        rows = [("tokenizers encode_batch (Rayon, all cores)", mb / min(r[0] for r in raw_runs),
                 mb / min(r[1] for r in raw_runs), 1.0, 1.0),
                (f"lmstack data prepare ({report.workers} workers, end to end)", mb / min(p[0] for p in prep_runs),
                 mb / min(p[1] for p in prep_runs), median(wall_ratios), median(core_ratios))]
        print(f"\ncorpus {args.input}: {len(texts)} documents, {mb:.1f} MB, {tokens:,} tokens; "
              f"{cores} cores, {cpu_name()}")
        print(f"{'':52s} {'MB/s':>7s} {'MB/CPU-s':>9s} {'wall ratio':>11s} {'per-core ratio':>15s}")
        for name, mbs, mbc, wr, cr in rows:
            print(f"{name:52s} {mbs:7.2f} {mbc:9.2f} {wr:10.2f}x {cr:14.2f}x")
        paired = (wall_ratios, core_ratios)
        if args.record:
            record(args, rows, len(texts), nbytes, tokens, cores, paired)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record(args, rows, docs, nbytes, tokens, cores, paired) -> None:
    path = Path(__file__).resolve().parent / "RESULTS.md"
    command = "python benchmarks/bench_data.py " + " ".join(sys.argv[1:])
    wall, core = paired
    lines = [f"\n### bench_data: data prepare vs tokenizers ({datetime.date.today().isoformat()})\n",
             f"- hardware: {cpu_name()}, {cores} cores available, Python {platform.python_version()}; a shared "
             "machine (other jobs were running, load varied during the run), so wall-clock MB/s are noisy",
             f"- command: `{command.strip()}`",
             f"- corpus: {args.input} ({docs} documents, {nbytes / 1e6:.1f} MB, {tokens:,} tokens), "
             f"BPE vocab {args.vocab_size}",
             f"- method: {args.repeats} back-to-back pairs (order alternating); MB/s and MB per CPU-second are "
             "best of the runs; ratios are the medians of the paired ratios. Per-core = MB per CPU-second "
             "(this process + its joined workers), which contention from other jobs disturbs far less "
             "than wall time",
             f"- paired wall-clock ratios: {', '.join(f'{x:.2f}' for x in wall)}; "
             f"per-core: {', '.join(f'{x:.2f}' for x in core)}\n",
             "| path | MB/s | MB per CPU-s | wall ratio | per-core ratio |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {mbs:.2f} | {mbc:.2f} | {wr:.2f}x | {cr:.2f}x |" for name, mbs, mbc, wr, cr in rows]
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()

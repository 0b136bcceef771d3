"""Tokenization throughput of `lmstack data prepare` against `tokenizers`' own encode_batch.

Both run in one process on the same text (the running Python's stdlib, or --input) with all
CPU cores: the library through its Rayon thread pool, `data prepare` through its worker
processes, end to end (reading files, NFC, control characters, hashing, dedup, shards).
Each is run --repeats times, alternating; the ratio reported is the median of the paired runs'
ratios (each pair ran back to back), MB/s are best-of (the machine may be shared).

    python benchmarks/bench_data.py                      # trains an 8192-token BPE on the stdlib first
    python benchmarks/bench_data.py --tokenizer DIR --repeats 3 --record
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmstack.data import PrepareConfig, prepare  # noqa: E402
from lmstack.data.sources import iter_documents  # noqa: E402
from lmstack.tokenizer import Tokenizer  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="stdlib", help="corpus (default: the stdlib .py files)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train one on the corpus)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="prepare workers (0 = all cores)")
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()

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
        raw_times, prep_times, tokens = [], [], 0
        for r in range(args.repeats):
            started = time.perf_counter()
            encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
            raw_times.append(time.perf_counter() - started)
            tokens = sum(len(e.ids) for e in encodings)
            del encodings
            out = work / f"out{r}"
            started = time.perf_counter()
            report = prepare(PrepareConfig([args.input], args.tokenizer, str(out), workers=args.workers,
                                           progress=False))
            prep_times.append(time.perf_counter() - started)
            shutil.rmtree(out)
            print(f"run {r + 1}: encode_batch {raw_times[-1]:.1f}s, data prepare {prep_times[-1]:.1f}s")
        raw, prep = nbytes / 1e6 / min(raw_times), report.input_bytes / 1e6 / min(prep_times)
        paired = sorted(r / p for r, p in zip(raw_times, prep_times))
        ratio = paired[len(paired) // 2] if len(paired) % 2 else sum(paired[len(paired) // 2 - 1:][:2]) / 2
        print("paired ratios (prepare / raw speed): " + ", ".join(f"{r:.2f}" for r in paired))
        rows = [("tokenizers encode_batch (Rayon, all cores)", raw, 1.0),
                (f"lmstack data prepare ({report.workers} workers, end to end)", prep, ratio)]
        print(f"\ncorpus {args.input}: {len(texts)} documents, {nbytes / 1e6:.1f} MB, {tokens:,} tokens; "
              f"{cores} cores, {cpu_name()}")
        print(f"{'':52s} {'MB/s':>8s} {'ratio':>7s}")
        for name, mbs, ratio in rows:
            print(f"{name:52s} {mbs:8.2f} {ratio:7.2f}x")
        if args.record:
            record(args, rows, len(texts), nbytes, tokens, cores, paired)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record(args, rows, docs, nbytes, tokens, cores, paired) -> None:
    path = Path(__file__).resolve().parent / "RESULTS.md"
    command = "python benchmarks/bench_data.py " + " ".join(sys.argv[1:])
    lines = [f"\n### bench_data: data prepare vs tokenizers ({datetime.date.today().isoformat()})\n",
             f"- hardware: {cpu_name()}, {cores} cores available, Python {platform.python_version()}; "
             "shared machine (other jobs were running), so absolute MB/s are noisy; MB/s are best of "
             f"{args.repeats} runs, the ratio is the median of {args.repeats} back-to-back pairs "
             f"({', '.join(f'{r:.2f}' for r in paired)})",
             f"- command: `{command.strip()}`",
             f"- corpus: {args.input} ({docs} documents, {nbytes / 1e6:.1f} MB, {tokens:,} tokens, "
             f"vocab {args.vocab_size if 'bench_data_' in args.tokenizer else args.tokenizer})\n",
             "| path | MB/s | vs raw |", "|---|---:|---:|"]
    lines += [f"| {name} | {mbs:.2f} | {ratio:.2f}x |" for name, mbs, ratio in rows]
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()

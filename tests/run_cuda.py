"""Run the GPU tests (`@pytest.mark.cuda`), one pytest process per test file.

A CUDA device-side assert (an out-of-bounds index in a kernel) leaves the CUDA context unusable
for the rest of the process, so one failing file would otherwise fail every file after it.
Each file runs in its own process, and the summary lists every file's outcome.

    python tests/run_cuda.py                 # every file with CUDA tests
    python tests/run_cuda.py tests/engine    # only under these paths
    python tests/run_cuda.py --log-dir OUT   # also keep each file's output in OUT/<file>.log
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def cuda_test_files(roots: list[Path]) -> list[Path]:
    files = []
    for root in roots:
        candidates = [root] if root.is_file() else sorted(root.rglob("test_*.py"))
        files += [f for f in candidates if "mark.cuda" in f.read_text(encoding="utf-8")]
    return files


def _name(f: Path) -> str:
    return str(f.relative_to(TESTS.parent)) if f.is_relative_to(TESTS.parent) else str(f)


def run_file(f: Path, log_dir: Path | None, timeout: float) -> tuple[int | str, str]:
    """One file in its own pytest process (and process group), its output streamed to the log as
    it comes, so a file that hangs, or a call stopped from outside, still leaves the test names
    that ran. On a timeout the whole group is killed: servers or compile workers it started too."""
    log = (log_dir / f"{f.parent.name}_{f.stem}.log") if log_dir else None
    cmd = [sys.executable, "-u", "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "cuda", str(f)]
    with tempfile.TemporaryFile("w+", encoding="utf-8") as scratch, \
            (open(log, "w", encoding="utf-8") if log else contextlib.nullcontext(scratch)) as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
        sink.flush()
        sink.seek(0) if sink is scratch else None
        output = scratch.read() if sink is scratch else log.read_text(encoding="utf-8", errors="replace")
    return code, output


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help="test files or directories (default: all of tests/)")
    ap.add_argument("--log-dir", type=Path, default=None, help="write each file's pytest output here")
    ap.add_argument("--timeout", type=float, default=400,
                    help="seconds per file before it (and every process it started) is killed")
    args = ap.parse_args()
    files = cuda_test_files([p.resolve() for p in args.paths] or [TESTS])
    if not files:
        print("no test file with @pytest.mark.cuda under", ", ".join(map(str, args.paths or [TESTS])))
        return 1
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        print("warning: torch sees no CUDA device, so every GPU test will be skipped", flush=True)
    results = []
    for f in files:
        start = time.perf_counter()
        code, output = run_file(f, args.log_dir, args.timeout)
        last = "TIMEOUT" if code == "timeout" else next(
            (line for line in reversed(output.strip().splitlines()) if line.strip()), "")
        results.append((f, code, time.perf_counter() - start, last))
        print(f"{_name(f)}: {last} ({results[-1][2]:.0f} s)", flush=True)
    failed = [r for r in results if r[1] not in (0, 5)]  # 5: every test deselected (none marked cuda)
    print(f"\n{len(results) - len(failed)} of {len(results)} files passed" +
          (": failed " + ", ".join(_name(r[0]) for r in failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

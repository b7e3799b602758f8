"""Run every benchmark, one after another, and print all their headline lines at the end.

    python benchmarks/run_all.py --quick              # every benchmark in its short mode (a smoke run)
    python benchmarks/run_all.py                      # the full runs (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick decode embed # some of them

Each benchmark runs as its own process (``python benchmarks/NAME.py [--quick]``, so one's threads and
memory do not touch the next) and its output streams through. At the end come the ``headline:`` lines of
every benchmark (see common.py), then which targets were missed. The exit status is 1 when a benchmark
crashed, timed out or printed no headline; a missed target is reported, not an error (a shared, loaded
machine misses targets that a quiet one meets).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import parse_headline

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"run_all.py", "common.py"}


def benchmark_files(folder: Path = HERE) -> list[Path]:
    """The benchmark scripts of ``folder``, sorted by name."""
    return sorted(p for p in folder.glob("*.py") if p.name not in NOT_BENCHMARKS)


def run_one(script: Path, quick: bool, timeout: float) -> tuple[int, list[str], float]:
    """Run one benchmark, echoing its output; returns (exit status, its headline lines, seconds).
    A timeout gives exit status 124."""
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    start = time.perf_counter()
    lines: list[str] = []
    env = {**os.environ, "TQDM_DISABLE": "1"}  # no progress bars (loading, dequantizing) in the log
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    ) as proc:
        assert proc.stdout is not None
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line.rstrip("\n"))
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # Ctrl-C: take the benchmark down too
                proc.kill()
    if code != 0 and time.perf_counter() - start >= timeout:
        code = 124
    return code, [ln for ln in lines if parse_headline(ln)], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns the exit status (1 when one crashed or printed no headline)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="benchmarks to run (file names or paths; default: all)")
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark (default 3600)")
    args = ap.parse_args(argv)
    scripts = benchmark_files()
    if args.names:
        by_name = {p.stem: p for p in scripts}
        scripts = []
        for name in args.names:
            path = Path(name)
            if path.is_file():
                scripts.append(path)
            elif path.stem in by_name:
                scripts.append(by_name[path.stem])
            else:
                ap.error(f"no benchmark {name!r}; benchmarks: {', '.join(sorted(by_name))}")
    headlines: list[str] = []
    failed: list[str] = []
    total = time.perf_counter()
    for script in scripts:
        print(f"=== {script.name}{' --quick' if args.quick else ''}", flush=True)
        code, found, seconds = run_one(script, args.quick, args.timeout)
        headlines += found
        if code != 0:
            why = "timed out" if code == 124 else f"exit status {code}"
            failed.append(f"{script.name} ({why}, after {seconds:.0f} s)")
        elif not found:
            failed.append(f"{script.name} (printed no headline line)")
        print(f"=== {script.name}: {seconds:.0f} s\n", flush=True)
    print(f"=== headlines ({len(scripts)} benchmarks, {time.perf_counter() - total:.0f} s)")
    for line in headlines:
        print(line)
    missed = [h for h in map(parse_headline, headlines) if h is not None and not h.met]
    print(f"targets met: {len(headlines) - len(missed)} of {len(headlines)}", end="")
    print(f"; missed: {'; '.join(h.what for h in missed)}" if missed else "")
    for f in failed:
        print(f"FAILED: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

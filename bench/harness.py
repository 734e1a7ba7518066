"""The one timing helper every benchmark suite uses.

CPU: ``time.perf_counter`` with a fixed thread count; CUDA: ``triton.testing.do_bench``.
Each suite prints a table (machine description on top) and appends its rows to
``bench/results.csv``. Speed targets live here in the printed output, never in tests.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_CSV = Path(__file__).resolve().parent / "results.csv"
COLUMNS = ["suite", "op", "provider", "shape", "dtype", "device", "median", "p20", "p80",
           "unit", "ratio_vs_peer", "git_sha", "timestamp"]


@dataclass
class Timing:
    """Seconds per call: median with the 20th and 80th percentiles."""
    median: float
    p20: float
    p80: float
    samples: list[float] = field(default_factory=list, repr=False)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bench(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10,
          min_time: float = 0.0, device: str = "cpu", threads: int | None = None) -> Timing:
    """Time ``fn()``. On CUDA uses ``triton.testing.do_bench`` (ms -> s)."""
    if device == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(q[0] / 1e3, q[1] / 1e3, q[2] / 1e3)
    if threads is not None:
        torch.set_num_threads(threads)
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), samples)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux: ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


@dataclass
class Row:
    suite: str
    op: str
    provider: str
    shape: str
    dtype: str
    device: str
    median: float
    p20: float
    p80: float
    unit: str
    ratio_vs_peer: float | None = None

    @classmethod
    def of(cls, suite, op, provider, shape, dtype, device, t: Timing, unit="s", scale=None, ratio=None):
        """A row from a Timing; ``scale(x)`` turns seconds into the unit (e.g. GB/s)."""
        f = scale or (lambda x: x)
        lo, hi = sorted((f(t.p20), f(t.p80)))
        return cls(suite, op, provider, shape, dtype, device, f(t.median), lo, hi, unit, ratio)


def append_csv(rows: list[Row], path: Path = RESULTS_CSV) -> None:
    new = not path.exists()
    sha, ts = git_sha(), _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.suite, r.op, r.provider, r.shape, r.dtype, r.device, f"{r.median:.6g}",
                        f"{r.p20:.6g}", f"{r.p80:.6g}", r.unit,
                        "" if r.ratio_vs_peer is None else f"{r.ratio_vs_peer:.3f}", sha, ts])


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n## {title}\nmachine: {machine()}")
    head = ["op", "provider", "shape", "dtype", "device", "median", "p20", "p80", "unit", "vs peer"]
    body = [[r.op, r.provider, r.shape, r.dtype, r.device, f"{r.median:.4g}", f"{r.p20:.4g}",
             f"{r.p80:.4g}", r.unit, "" if r.ratio_vs_peer is None else f"{r.ratio_vs_peer:.2f}x"]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for b in body:
        print(" | ".join(c.ljust(w) for c, w in zip(b, widths)))


def report(title: str, rows: list[Row], csv_path: Path = RESULTS_CSV) -> None:
    """Print the table and append the rows to the CSV."""
    print_table(title, rows)
    append_csv(rows, csv_path)

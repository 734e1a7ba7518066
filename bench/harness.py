"""The one timing helper every benchmark suite uses.

CPU: ``time.perf_counter`` with a fixed thread count; CUDA: ``triton.testing.do_bench``.
``bench`` times one callable (warm-up, repeats, median with p20/p80); ``paired`` times several
providers call by call in turn (ABBA order), so outside load on a shared machine hits all alike,
and reports per provider the median of the paired ratios. Peak memory: RSS on CPU
(``/proc/self`` high-water mark, resettable), ``max_memory_allocated`` on CUDA
(``reset_peak_memory`` / ``peak_memory``); ``peak_allocated_during(fn)`` gives the tensor memory
one call allocates at its peak (CPU: the profiler's allocator accounting). Each suite prints a table (machine description on
top) and appends its rows to ``bench/results.csv``. Speed targets live in the printed output,
never in tests.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qru.io import write_text
from qru.kernels.machine import MALLOC_ENV as MALLOC_ENV_KEYS
from qru.kernels.machine import describe as describe_machine

# QRU_BENCH_CSV redirects the appended rows (e.g. to /dev/null for trial runs).
RESULTS_CSV = Path(os.environ.get("QRU_BENCH_CSV") or Path(__file__).resolve().parent / "results.csv")
# The machine columns name where each row was measured (qru.kernels.machine.describe()).
MACHINE_COLUMNS = ["cpu_model", "isa", "cores", "torch", "threads", "allocator"]
COLUMNS = ["suite", "op", "provider", "shape", "dtype", "device", "median", "p20", "p80",
           "unit", "ratio_vs_peer", "git_sha", "timestamp", *MACHINE_COLUMNS]


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


def balanced_orders(k: int) -> list[list[int]]:
    """Orders of ``k`` providers, one per turn in rotation, in which every provider runs right after
    every other equally often (a Williams design: k orders for even k, 2k for odd k; for two, AB BA),
    so no provider always inherits the same one's after-effects (its caches, its spinning threads),
    and none runs twice in a row across a turn boundary (k > 2)."""
    first = [0]
    for j in range(1, k):
        first.append((j + 1) // 2 if j % 2 else k - j // 2)
    rows = [[(x + r) % k for x in first] for r in range(k)]
    if k % 2 == 0:
        return rows
    rows += [row[::-1] for row in rows]

    def chain(done: list[list[int]], rest: list[list[int]]) -> list[list[int]] | None:
        # the orders arranged so that no turn starts with the provider that ended the one before
        if not rest:
            return done if done[-1][-1] != done[0][0] else None
        for i, row in enumerate(rest):
            if row[0] != done[-1][-1]:
                got = chain(done + [row], rest[:i] + rest[i + 1:])
                if got:
                    return got
        return None

    return chain(rows[:1], rows[1:]) or rows


def paired(fns: dict[str, Callable[[], object]], samples: int, *, device: str = "cpu", warmup: int = 1
           ) -> tuple[dict[str, Timing], dict[str, float]]:
    """Time each provider once per turn, ``samples`` turns, the order of each turn taken in rotation
    from :func:`balanced_orders` (for two providers ABBA...) so slow drift and each provider's
    after-effects charge all alike. Returns per-provider timings and, per provider, the median over
    turns of (first provider's time / this provider's time): the speed-up against the first
    provider, robust to load bursts that hit one turn."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    orders = balanced_orders(len(names))
    for i in range(samples):
        for name in (names[j] for j in orders[i % len(orders)]):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fns[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    first = names[0]
    out = {k: Timing(statistics.median(v), _quantile(v, 0.2), _quantile(v, 0.8), v) for k, v in times.items()}
    ratios = {k: statistics.median(a / b for a, b in zip(times[first], v)) for k, v in times.items()}
    return out, ratios


def _proc_status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (the high-water mark; see ``reset_peak_memory``)."""
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    return _proc_status_bytes("VmRSS") or 0


def reset_peak_memory(device: str = "cpu") -> int:
    """Reset the peak-memory counter; returns the memory in use now (the baseline).
    CPU: writes 5 to ``/proc/self/clear_refs`` (resets VmHWM to the current RSS)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return current_rss_bytes()


def peak_allocated_during(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes of tensor memory allocated by ``fn()`` above what was allocated when it started.
    CUDA: ``max_memory_allocated``; CPU: the profiler's allocator accounting (``profile_memory``),
    which, unlike RSS, does not depend on what the C allocator keeps cached from earlier work."""
    if device == "cuda":
        base = reset_peak_memory("cuda")
        fn()
        return peak_memory("cuda") - base
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max([0, *totals])


def peak_memory(device: str = "cpu") -> int:
    """Peak bytes since ``reset_peak_memory``: RSS high-water mark on CPU, ``max_memory_allocated`` on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def machine() -> str:
    m = describe_machine()
    desc = (f"{m['cpu_model']} ({m['isa']}), {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
            f"allocator {m['allocator']}")
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


def _migrate_header(path: Path) -> None:
    """Rewrite a CSV written before the machine columns existed with those columns added (empty:
    the machine was not recorded), atomically; a file with the current header is left alone."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] == COLUMNS:
        return
    head = rows[0]
    if head != COLUMNS[:len(head)]:
        raise ValueError(f"{path}: unexpected header {head} (expected a prefix of {COLUMNS})")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows(r + [""] * (len(COLUMNS) - len(r)) for r in rows[1:])
    write_text(path, buf.getvalue())


def append_csv(rows: list[Row], path: Path = RESULTS_CSV) -> None:
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0 and path.is_file()
    if not new:
        _migrate_header(path)
    sha, ts = git_sha(), _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    m = describe_machine()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.suite, r.op, r.provider, r.shape, r.dtype, r.device, f"{r.median:.6g}",
                        f"{r.p20:.6g}", f"{r.p80:.6g}", r.unit,
                        "" if r.ratio_vs_peer is None else f"{r.ratio_vs_peer:.3f}", sha, ts,
                        *(m[c] for c in MACHINE_COLUMNS)])


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
    """Print the table and append the rows to the CSV (and, in a child of :func:`run_under_allocators`,
    the ratios to its ``QRU_BENCH_RATIOS`` file)."""
    print_table(title, rows)
    append_csv(rows, csv_path)
    _record_ratios(rows)


# --- fair ratios: the same suite under several allocator settings ------------------------------------
#
# Allocation is not free: on a VM a page fault costs microseconds, and glibc hands every freed block
# above its (dynamic) mmap threshold back to the kernel, so a program that makes fresh multi-MB
# temporaries (HF, peft) pays page faults on each, one that reuses buffers (qru) far fewer. Both sides of
# a ratio always share one process and one allocator; running the suite again with glibc told to keep
# what it frees (``glibc-keep``) or with a preloaded allocator shows how much of a ratio comes from
# allocation: share = ratio(default) / ratio(setting).

GLIBC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # the largest glibc accepts: blocks < 32 MiB from the heap
              "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # never give the heap's top back
              "MALLOC_TOP_PAD_": str(64 << 20)}        # grow the heap 64 MiB at a time
PRELOADABLE = ("libjemalloc.so.2", "libtcmalloc.so.4", "libtcmalloc_minimal.so.4", "libmimalloc.so.2")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib", "/lib/x86_64-linux-gnu")


def allocator_settings() -> dict[str, dict[str, str]]:
    """name -> environment of each allocator setting: ``default`` (glibc as it comes), ``glibc-keep``
    (:data:`GLIBC_KEEP`) and each preloadable allocator installed here (``jemalloc``, ``tcmalloc``, ...)."""
    out = {"default": {}, "glibc-keep": dict(GLIBC_KEEP)}
    for lib in PRELOADABLE:
        for d in LIB_DIRS:
            path = Path(d) / lib
            if path.exists():
                out.setdefault(lib[3:].split(".so")[0].split("_")[0], {"LD_PRELOAD": str(path)})
                break
    return out


def add_allocator_arg(ap) -> None:
    ap.add_argument("--allocators", nargs="*", default=None, metavar="NAME",
                    help="run the suite once per allocator setting, each in a fresh process (no NAME: default, "
                         "glibc-keep and each preloadable allocator installed), and print which part of each "
                         "ratio comes from allocation")


def _strip_allocator_arg(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if a == "--allocators":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


def _record_ratios(rows: list[Row]) -> None:
    path = os.environ.get("QRU_BENCH_RATIOS")
    if not path:
        return
    import json

    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() and p.stat().st_size else {}
    for r in rows:
        if r.ratio_vs_peer is not None and r.unit != "MiB":
            data[" | ".join((r.op, r.provider, r.shape, r.dtype))] = r.ratio_vs_peer
    p.write_text(json.dumps(data))


def run_under_allocators(script: str, argv: list[str] | None, names: list[str]) -> int:
    """Run ``script`` with ``argv`` (``--allocators`` removed) once per allocator setting in ``names``
    (empty: all of :func:`allocator_settings`), each a child process whose environment has only that
    setting (its rows name it in the CSV's allocator column); then print each ratio per setting and the
    part that comes from allocation. Returns the first non-zero exit code, else 0."""
    import json
    import sys
    import tempfile

    settings = allocator_settings()
    names = names or list(settings)
    unknown = [n for n in names if n not in settings]
    if unknown:
        raise SystemExit(f"--allocators: unknown {', '.join(unknown)} (here: {', '.join(settings)})")
    argv = _strip_allocator_arg(list(sys.argv[1:] if argv is None else argv))
    results, rc = {}, 0
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", *MALLOC_ENV_KEYS)}
            env.update(settings[name], QRU_BENCH_RATIOS=str(Path(d) / f"{name}.json"), PYTHONUNBUFFERED="1")
            print(f"\n==== allocator {name}: {' '.join(f'{k}={v}' for k, v in settings[name].items()) or 'glibc defaults'}",
                  flush=True)
            code = subprocess.run([sys.executable, script, *argv], env=env).returncode
            rc = rc or code
            f = Path(d) / f"{name}.json"
            results[name] = json.loads(f.read_text()) if f.exists() else {}
    print_allocator_split(results)
    return rc


def print_allocator_split(results: dict[str, dict[str, float]]) -> None:
    """Each ratio under each setting, and ratio(default) / ratio(setting): the factor of the default
    ratio that comes from allocation (1.0: none; > 1: the peer pays more for allocation than qru)."""
    names = list(results)
    if "default" not in results or len(names) < 2:
        return
    others = [n for n in names if n != "default"]
    print("\n## ratios under each allocator setting (both sides always in one process, one allocator)")
    print("   share = ratio(default) / ratio(setting): the factor of the default ratio that allocation accounts for")
    head = f"{'op | provider | shape | dtype':80} {'default':>8} " + " ".join(f"{n:>12} {'share':>6}" for n in others)
    print(head)
    for key, r0 in results["default"].items():
        if not all(key in results[n] for n in others) or key.split(" | ")[1] in ("copy",):
            continue
        cells = " ".join(f"{results[n][key]:11.2f}x {r0 / results[n][key]:6.2f}" for n in others)
        print(f"{key[:80]:80} {r0:7.2f}x {cells}")

"""What machine this is, as the benchmarks and the CPU dispatch need it named: the CPU model, its
instruction-set level, cores, torch version and threads, and the allocator settings. Read from
``/proc/cpuinfo`` and the environment; nothing is assumed from the vendor."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

# Highest level first: each needs the flags of the levels below it too.
ISA_LEVELS = (
    ("amx", ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")),
    ("avx512_bf16", ("avx512_bf16", "avx512f")),
    ("avx512", ("avx512f", "avx512bw", "avx512vl")),
    ("avx2", ("avx2", "fma")),
)
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_")


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """``(model name, flags)`` of the first processor in a ``/proc/cpuinfo`` text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return model, flags


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, flags = "", set()
    if not model:
        import platform

        model = platform.processor() or platform.machine()
    return model, frozenset(flags)


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    return _cpuinfo()[1]


def isa_level(flags: set[str] | frozenset[str] | None = None) -> str:
    """The highest of ``amx``, ``avx512_bf16``, ``avx512``, ``avx2`` whose flags the CPU has, else ``baseline``."""
    flags = _cpuinfo()[1] if flags is None else flags
    for level, need in ISA_LEVELS:
        if all(f in flags for f in need):
            return level
    return "baseline"


def allocator(env: dict[str, str] | None = None) -> str:
    """The C allocator: a preloaded one (``jemalloc``, ``tcmalloc``, ...) or ``glibc``, with any
    glibc ``MALLOC_*`` tunables set, e.g. ``glibc MALLOC_MMAP_THRESHOLD_=33554432``."""
    env = os.environ if env is None else env
    pre = [Path(p).name.split(".so")[0] for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    name = "+".join(pre) or "glibc"
    tun = [f"{k}={env[k]}" for k in MALLOC_ENV if env.get(k)]
    return " ".join([name, *tun])


def parse_loadavg(text: str) -> int:
    """The number of runnable tasks right now (the ``R`` of ``/proc/loadavg``'s ``R/T`` field)."""
    try:
        return int(text.split()[3].split("/")[0])
    except (IndexError, ValueError):
        raise ValueError(f"/proc/loadavg: cannot read the runnable count from {text.strip()!r}") from None


_loadavg_fd: list[int | None] = []  # /proc/loadavg, opened once: pread on it costs ~25 us, open+read+close ~150 us


def _read_loadavg() -> str:
    if not _loadavg_fd:
        try:
            _loadavg_fd.append(os.open("/proc/loadavg", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except OSError:
            _loadavg_fd.append(None)
    fd = _loadavg_fd[0]
    if fd is None:
        raise OSError("/proc/loadavg is not readable")
    return os.pread(fd, 256, 0).decode()


def own_runnable_threads() -> int:
    """This process's threads in state R, running or waiting for a core (the caller is one), from
    ``/proc/self/task/*/stat``; raises OSError where unreadable."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except FileNotFoundError:  # the thread has just exited
            continue
        # "tid (comm) S ...": comm may hold spaces and parentheses, so the state follows the last ")"
        count += stat[stat.rfind(b")") + 2:][:1] == b"R"
    return count


def others_running() -> int | None:
    """How many runnable tasks of other processes there are at this instant, or None where unknown:
    ``/proc/loadavg``'s runnable count less this process's own runnable threads (the reader, and any
    OpenMP worker still spinning after a torch op: qru's parallel kernels join that pool, see
    ``qru/csrc/qru_common.h``, so it holds no core from them). About 10 us."""
    try:
        return max(0, parse_loadavg(_read_loadavg()) - own_runnable_threads())
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe() -> dict[str, str]:
    """The machine as benchmark rows record it."""
    return {"cpu_model": cpu_model(), "isa": isa_level(), "cores": str(os.cpu_count() or 0),
            "torch": torch.__version__, "threads": str(torch.get_num_threads()), "allocator": allocator()}

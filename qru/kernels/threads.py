"""How many threads a qru parallel CPU kernel runs with, so that a busy machine does not stall it.

A parallel loop ends when its last thread does. When another job holds a core, the thread put on it
waits for a time slice (milliseconds), and the whole kernel with it: on a 2-core VM with one other
job the NF4 quantizer (then an OpenMP loop) fell from 58x bitsandbytes at one thread to 16x at two.
Every parallel C++ kernel runs on torch's OpenMP pool where no other process contends for the
cores (its workers are awake after every torch op), else on ``qru::Team`` (qru/csrc/qru_common.h),
whose workers wait passively, and a worker that starts late finds the job closed instead of
holding up the caller (:func:`cpu_pool` says which, now). On top, the thread rule ``kernel_threads`` (measured per machine by
``qru.kernels.calibrate``, overridable with ``QRU_KERNEL_THREADS=all|adaptive|one``) sets the team
size of each quantizer call: torch's thread count, the cores free at that instant, or one. The
training-path kernels (norms, attention, LoRA, the log-probs head) run at torch's thread count.

The thread count never changes a result: every kernel splits its work into the same blocks, rows
or groups whatever the team size (tests/test_threads.py).

torch's own parallel ops are not so: a reduction over two OpenMP threads waits a scheduler slice
for a thread another job keeps off its core (``x.sum()`` of 0.5M floats: 0.04 ms at one thread,
7 ms at two on a busy 2-core VM). :func:`step_threads` is the training loop's remedy, opted into
with ``threads="adaptive"`` (``--threads adaptive``): each step runs on the cores free of other
jobs at its start. It is not the default because torch's results depend on its thread count in
the last bits, so a run's numbers would then depend on the machine's load.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, TypeVar

import torch

from qru.kernels import calibrate
from qru.kernels._backend import load_cpp_ext

SMALL = 1 << 16  # below this many values a kernel runs on one thread: the team costs more than it saves

F = TypeVar("F", bound=Callable)


ADAPTIVE = "adaptive"


def check_threads(value, name: str = "threads"):
    """A thread setting: None (torch's count, as set), a positive int, or ``"adaptive"``; returns
    it, or raises ValueError naming ``name``."""
    if value is None or value == ADAPTIVE or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f"{name} must be a positive integer or {ADAPTIVE!r}, got {value!r}")


@contextlib.contextmanager
def step_threads(setting, limit: int | None = None) -> Iterator[int]:
    """Within the block torch runs on ``setting`` threads: None keeps the present count, an int
    sets it, ``"adaptive"`` takes the cores free of other jobs right now, at most ``limit``
    (default: the present count). Restored afterwards. Yields the count."""
    n = torch.get_num_threads()
    check_threads(setting)
    k = n if setting is None else setting if setting != ADAPTIVE else min(limit or n, calibrate.recent_free_cores())
    if k == n:
        yield k
        return
    torch.set_num_threads(k)
    try:
        yield k
    finally:
        torch.set_num_threads(n)


def cpu_pool(threads: int | None = None) -> dict | None:
    """Where a qru C++ parallel loop on ``threads`` threads (default: torch's count) runs right now:
    ``{"pool": "omp" | "team" | "serial", "others": other processes' runnable tasks (-1: unknown),
    "cores": usable cores}``; None without the C++ kernels. ``QRU_CPU_POOL=auto|omp|team`` forces the pool."""
    ext = load_cpp_ext("quant")
    if ext is None:
        return None
    pool, others, cores = ext.cpu_pool(torch.get_num_threads() if threads is None else threads)
    return {"pool": pool, "others": others, "cores": cores}


_rule_memo: list = [None, 1]  # [(torch threads, override, load reading time), threads]: kernel_threads' fast path


def kernel_threads(work: int) -> int:
    """Threads for a kernel over ``work`` values under this machine's thread rule (worked out again
    when the thread count, the override or the load reading changes: a few us per call otherwise)."""
    n = torch.get_num_threads()
    if n <= 1 or work < SMALL:
        return 1
    key = (n, os.environ.get("QRU_KERNEL_THREADS"), calibrate.load_reading_time())
    if _rule_memo[0] != key:
        _rule_memo[:] = [key, calibrate.rule_threads(calibrate.pick("kernel_threads"), n)]
    return _rule_memo[1]


def kernel_team(work: int):
    """A block in which torch's thread count (which the C++ kernels use) is :func:`kernel_threads`;
    restored afterwards. Yields the count."""
    return step_threads(kernel_threads(work))


def with_kernel_team(work_of: Callable[..., int]) -> Callable[[F], F]:
    """Decorator: run the wrapped C++ entry point under :func:`kernel_team` of ``work_of(*args)``."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            # kernel_team without the context manager (a few us on a ~0.1 ms call)
            n = torch.get_num_threads()
            k = kernel_threads(work_of(*args, **kwargs))
            if k == n:
                return fn(*args, **kwargs)
            torch.set_num_threads(k)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_num_threads(n)
        return run  # type: ignore[return-value]
    return wrap

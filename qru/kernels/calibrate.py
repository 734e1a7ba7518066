"""Per-machine choices between CPU implementations, measured once and cached, never assumed from
the CPU vendor.

Each choice names its candidates and a short timing probe. :func:`decide` returns the pick and why:

1. an override wins: the environment variable ``QRU_<CHOICE>`` (e.g. ``QRU_DENSE_FP32=torch``);
2. else the cached measurement for this machine: ``$QRU_CACHE/calibration/<key>.json`` (default
   ``~/.cache/qru``), the key hashing the CPU model, ISA level, core count, torch version and thread
   count (:func:`qru.kernels.machine.describe`), so a cache shared between machines or torch versions
   never answers for the wrong one; a file of another schema version, another key or unreadable is
   stale and measured again;
3. else measure now (about half a second per choice), write the cache atomically, and use it.

A measurement taken while another job held a core (``busy``, :func:`load_state`) may be skewed by
it: the cache marks it, and the first process that finds the machine idle measures it again.

``qru doctor`` prints the machine, every choice, why, and the cache path.

Choices:

- ``dense_fp32``: the fp32 CPU GEMMs with gradients (``qru.kernels.dense``, taken by
  :func:`qru.kernels.linear.linear`): oneDNN (``mkldnn._linear_pointwise``) or torch's ``mm`` (MKL's
  sgemm). On AMD CPUs MKL runs its AVX2 path and oneDNN wins by about 2x; on Intel both reach the
  same roofline.
- ``packed_fp32``: the fp32 CPU linears without gradients (:func:`qru.kernels.linear.linear`):
  oneDNN with a weight packed once, or ``F.linear``.
- ``packed_bf16``: the bf16 CPU linears without gradients above :data:`PACKED_BF16_MIN_ROWS` rows
  (decoding's batched rows, prefill; :func:`qru.kernels.linear.linear`): oneDNN with the weight
  packed once (on AMX CPUs its tile GEMM, with no per-call reorder of the weight), or the default
  bf16 path (``qru.kernels.bf16_linear``: the C++ skinny kernel up to its row limit, torch's bf16
  GEMM above). At 1-4 rows the skinny kernel's prefetched weight stream stays (no choice).
- ``kernel_threads``: the thread rule of qru's parallel CPU kernels (``qru.kernels.threads``) at more
  than one torch thread. ``all``: torch's thread count; ``adaptive``: per call, as many threads as
  there are cores with no other runnable task at that instant (``/proc/loadavg``); ``one``: a single
  thread. The probe (int8 quantize + dequantize of 2M bf16 values) times the three, each as its
  rule decides. The best rule depends on the load, so this choice is decided and cached per **load
  state** (:data:`LOAD_AWARE`): ``idle`` (as many free cores as threads) or ``busy`` (another job
  holds a core). A rule measured while busy is never used on an idle machine, nor the reverse: the
  first call in the other state measures it then. A probe during which the state changed is used by
  this process but not cached.

A non-default candidate is picked only when it is at least ``MARGIN`` faster than the default
(torch's own path; ``all`` for the thread rule).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from qru.io import write_json
from qru.kernels._backend import load_cpp_ext, loaded_cpp_ext
from qru.kernels.bf16_linear import bf16_linear, native_bf16_cpu
from qru.kernels import machine
from qru.kernels.machine import describe, usable_cores

CACHE_VERSION = 3  # 2: kernel_threads added, quantizers on qru::Team; 3: kernel_threads per load state
MARGIN = 0.05  # oneDNN must be this much faster to be chosen over torch's default path
LOAD_AWARE = frozenset({"kernel_threads"})  # choices decided and cached per load state
LOAD_STATES = ("idle", "busy")
LOAD_SAMPLE_S = 0.05  # the load is read at most this often (the C++ reader's value ~1 us, a /proc scan 10-140 us)


@dataclass
class Decision:
    choice: str
    pick: str
    source: str  # "override" | "cache" | "measured" | "unavailable"
    why: str
    seconds: dict[str, float] = field(default_factory=dict)  # probe time per candidate


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """torch's oneDNN linear is present and agrees with ``F.linear`` on a probe."""
    if not torch.backends.mkldnn.is_available():
        return False
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return False
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(24, 16, generator=g), torch.randn(24, generator=g), torch.randn(3, 16, generator=g)
    try:
        y = op(x, w, b, "none", [], "")
        y2 = op.binary(x, y, w, None, "add")
    except (RuntimeError, AttributeError):
        return False
    ref = torch.nn.functional.linear(x, w, b)
    return bool(torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
                and torch.allclose(y2, ref + x @ w.t(), atol=1e-5, rtol=1e-5))


def _probe_shapes() -> list[tuple[int, int, int]]:
    """(M, K, N): a square block, an up-projection and a down-projection of a small training step."""
    return [(512, 512, 512), (1024, 512, 1536), (1024, 1536, 512)]


def _paired_seconds(fns: dict[str, Callable[[], object]], rounds: int = 9) -> dict[str, float]:
    """Median seconds per candidate, timed call by call in ABBA order (load bursts hit all alike)."""
    names = list(fns)
    for fn in fns.values():  # warm-up (first-call allocation, oneDNN primitive creation)
        fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(rounds):
        for k in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _probe_dense() -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    ops = [(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)) for m, k, n in _probe_shapes()]
    lin = torch.ops.mkldnn._linear_pointwise
    return _paired_seconds({
        "torch": lambda: [torch.mm(x, w.t()) for x, w in ops],
        "onednn": lambda: [lin(x, w, None, "none", [], "") for x, w in ops],
    })


def _probe_packed() -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 512, 1536), (8, 1536, 512), (256, 512, 512)]  # batched decode, prefill rows
    ops = [(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)) for m, k, n in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for _, w in ops]
    lin = torch.ops.mkldnn._linear_pointwise
    with torch.no_grad():
        return _paired_seconds({
            "torch": lambda: [F.linear(x, w) for x, w in ops],
            "onednn": lambda: [lin(x, p, None, "none", [], "") for (x, _), p in zip(ops, packed)],
        })


PACKED_BF16_MIN_ROWS = 4  # at most this many rows: the C++ skinny kernel (bandwidth-bound, prefetched)


def _probe_packed_bf16() -> dict[str, float]:
    """Batched decode (8 rows) and prefill (32 rows) through 16 distinct weights (12 MiB, cold in
    cache as a model's are), bf16: the default bf16 path against oneDNN on packed weights."""
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16) for n, k in [(1536, 512), (512, 1536)] * 8]
    xs = {(m, k): torch.randn(m, k, generator=g).to(torch.bfloat16) for m in (8, 32) for k in (512, 1536)}
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in ws]
    lin = torch.ops.mkldnn._linear_pointwise
    with torch.no_grad():
        return _paired_seconds({
            "torch": lambda: [bf16_linear(xs[(m, w.shape[1])], w) for m in (8, 32) for w in ws],
            "onednn": lambda: [lin(xs[(m, w.shape[1])], p, None, "none", [], "")
                               for m in (8, 32) for w, p in zip(ws, packed)],
        })


def others_running() -> int | None:
    """Other processes' runnable tasks right now, or None where unknown: the C++ kernels' background
    reading where they are loaded (a call costs ~1 us), else :func:`qru.kernels.machine.others_running`
    (a /proc scan, 10-140 us)."""
    ext = loaded_cpp_ext("quant")
    if ext is None:
        return machine.others_running()
    v = int(ext.others_running())
    return None if v < 0 else v


_sample: list = [None, -1.0, None]  # [the others_running function read, when (monotonic s), its value]


def _others_now() -> int | None:
    """:func:`others_running`, read at most every :data:`LOAD_SAMPLE_S` seconds."""
    now = time.monotonic()
    if _sample[0] is not others_running or now - _sample[1] > LOAD_SAMPLE_S:
        _sample[:] = [others_running, now, others_running()]
    return _sample[2]


def load_reading_time() -> float:
    """When the load reading in use was taken (monotonic s), refreshed first if stale: a decision
    made from the load holds until this changes."""
    _others_now()
    return _sample[1]


def recent_free_cores() -> int:
    """Cores with no other runnable task (at least 1; all where unknown), from a recent reading."""
    cores = usable_cores()
    others = _others_now()
    return cores if others is None else max(1, cores - others)


def load_state(threads: int | None = None) -> str:
    """``idle`` when at least ``threads`` cores (default: torch's thread count) have no other
    runnable task right now (or the load is unknown), else ``busy``."""
    n = torch.get_num_threads() if threads is None else threads
    others = _others_now()
    return "idle" if others is None or usable_cores() - others >= n else "busy"


def rule_threads(rule: str, threads: int | None = None) -> int:
    """Threads a kernel gets under the thread rule ``rule`` (a ``kernel_threads`` candidate) with
    ``threads`` torch threads (default: the current count)."""
    n = torch.get_num_threads() if threads is None else threads
    if rule == "one" or n <= 1:
        return 1
    if rule == "all":
        return n
    if rule == "adaptive":
        return min(n, recent_free_cores())
    raise ValueError(f"unknown thread rule {rule!r} (known: all, adaptive, one)")


def _probe_threads() -> dict[str, float]:
    """int8 quantize + dequantize of 2M bf16 values, four times per call, under each thread rule."""
    ext = load_cpp_ext("quant")
    x = (torch.randn(2048, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16).reshape(-1)
    empty = torch.empty(0, dtype=torch.uint8)
    n = torch.get_num_threads()

    def run(rule: str) -> None:
        for _ in range(4):
            k = rule_threads(rule, n)
            torch.set_num_threads(k)
            try:
                data, scales, _ = ext.int_quantize(x, 1024, 1024, 2, 0.0, False)
                ext.int_dequantize(data, scales, empty, 1024, 1024, 2, torch.bfloat16, False)
            finally:
                torch.set_num_threads(n)

    return _paired_seconds({r: functools.partial(run, r) for r in ("all", "adaptive", "one")}, rounds=9)


# choice -> (candidates, default, probe, is a non-default candidate usable here)
CHOICES: dict[str, tuple[tuple[str, ...], str, Callable[[], dict[str, float]], Callable[[], bool]]] = {
    "dense_fp32": (("onednn", "torch"), "torch", _probe_dense, onednn_available),
    "packed_fp32": (("onednn", "torch"), "torch", _probe_packed,
                    lambda: onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
    "packed_bf16": (("onednn", "torch"), "torch", _probe_packed_bf16,
                    lambda: (onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                             and native_bf16_cpu())),
    "kernel_threads": (("all", "adaptive", "one"), "all", _probe_threads,
                       lambda: torch.get_num_threads() > 1 and load_cpp_ext("quant") is not None),
}


def cache_root() -> Path:
    return Path(os.environ.get("QRU_CACHE") or Path.home() / ".cache" / "qru") / "calibration"


def machine_key(threads: int | None = None) -> tuple[str, dict]:
    """(hash, the machine fields it hashes) for ``threads`` torch threads (default: the current count)."""
    m = describe()
    m.pop("allocator", None)  # the allocator does not change which GEMM library is faster
    if threads is not None:
        m["threads"] = str(threads)
    return hashlib.sha1(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16], m


def cache_path(threads: int | None = None) -> Path:
    return cache_root() / f"{machine_key(threads)[0]}.json"


def _read_cache(path: Path, key: str) -> dict | None:
    """The cached decisions, or None when missing or stale (other version or key, unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("key") != key:
        return None
    return data


def override(choice: str) -> str | None:
    """The pick forced by ``QRU_<CHOICE>``, or None. Raises on a value that is not a candidate."""
    var = f"QRU_{choice.upper()}"
    value = os.environ.get(var, "").strip().lower()
    if not value:
        return None
    cands = CHOICES[choice][0]
    if value not in cands:
        raise ValueError(f"{var}={value!r} is not one of {', '.join(cands)}")
    return value


def measure(choice: str) -> Decision:
    """Time the candidates of ``choice`` now (no cache)."""
    cands, default, probe, usable = CHOICES[choice]
    if not usable():
        why = ("one thread: no rule to choose" if choice == "kernel_threads" and torch.get_num_threads() <= 1
               else "the alternative is not available in this torch build")
        return Decision(choice, default, "unavailable", why)
    secs = probe()
    others = sorted((c for c in cands if c != default), key=lambda c: secs[c])
    other = others[0]
    faster = secs[other] < secs[default] * (1 - MARGIN)
    pick = other if faster else default
    why = (" vs ".join(f"{c} {secs[c] * 1e3:.1f} ms" for c in [other, default, *others[1:]]) + " on the probe: "
           + (f"{other} is {secs[default] / secs[other]:.2f}x faster" if faster
              else f"{other} is not at least {MARGIN:.0%} faster, keep {default}"))
    return Decision(choice, pick, "measured", why, secs)


_memo: dict[tuple[int, str], Decision] = {}  # (threads, entry): the machine is the same within a process


def entry(choice: str, load: str | None) -> str:
    """The cache entry of ``choice``: ``kernel_threads@idle`` for a load-aware choice, else the name."""
    return f"{choice}@{load}" if choice in LOAD_AWARE and load else choice


def decide(choice: str, threads: int | None = None, recalibrate: bool = False, load: str | None = None,
           measure_missing: bool = True) -> Decision | None:
    """The pick for ``choice`` on this machine at ``threads`` torch threads (default: the current
    count): override, else cache, else measured now (and cached). A load-aware choice is decided
    for the load state ``load`` (default: the present one); a state other than the present one is
    never measured (None when not cached), nor is any missing entry with ``measure_missing=False``."""
    if choice not in CHOICES:
        raise ValueError(f"unknown calibration choice {choice!r} (known: {', '.join(CHOICES)})")
    forced = override(choice)
    if forced is not None:
        return Decision(choice, forced, "override", f"QRU_{choice.upper()}={forced}")
    if load is not None and load not in LOAD_STATES:
        raise ValueError(f"unknown load state {load!r} (known: {', '.join(LOAD_STATES)})")
    threads = torch.get_num_threads() if threads is None else threads
    if choice in LOAD_AWARE and threads <= 1:
        return Decision(choice, CHOICES[choice][1], "unavailable", "one thread: no rule to choose")
    aware = choice in LOAD_AWARE
    load = (load or load_state(threads)) if aware else None
    name = entry(choice, load)
    if not recalibrate and (threads, name) in _memo:
        return _memo[(threads, name)]
    now = load_state(threads)
    key, fields = machine_key(threads)
    path = cache_root() / f"{key}.json"
    data = _read_cache(path, key)
    d = (data or {}).get("choices", {}).get(name)
    # a load-aware entry holds for its own state; another measured while busy only until the machine is idle
    provisional = d is not None and not aware and d.get("load") == "busy" and now == "idle"
    if not recalibrate and d is not None and not provisional:
        dec = Decision(choice, d["pick"], "cache", d["why"], d.get("seconds", {}))
    elif not measure_missing or load != now and aware:
        return None
    else:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            dec = measure(choice)
        finally:
            torch.set_num_threads(old)
        after = load_state(threads)
        if dec.source == "measured":
            dec.why = f"measured {now}: {dec.why}"
        if aware and after != now:  # the state changed during the probe
            dec.why += " (the load changed during the probe: used by this process, not cached)"
        else:
            data = data or {"version": CACHE_VERSION, "key": key, "machine": fields, "choices": {}}
            data["choices"][name] = {k: v for k, v in asdict(dec).items() if k in ("pick", "why", "seconds")}
            data["choices"][name]["load"] = "busy" if "busy" in (now, after) else "idle"
            write_json(path, data, indent=1, fault=False)  # a cache: not a numbered fault point
    _memo[(threads, name)] = dec
    _picks.pop((name, threads), None)
    return dec


_picks: dict[tuple[str, int], str] = {}  # (entry, threads) -> pick: the per-call fast path of pick()


def pick(choice: str) -> str:
    """Just the pick of :func:`decide` at the current thread count (and, for a load-aware choice,
    the present load state; memoised per process; an override is read on every call). Cheap: the
    linear dispatch asks on every call."""
    forced = override(choice)
    if forced is not None:
        return forced
    n = torch.get_num_threads()
    load = load_state(n) if choice in LOAD_AWARE else None
    key = (entry(choice, load), n)
    got = _picks.get(key)
    if got is None:
        dec = decide(choice, load=load)
        if dec is None:  # the load state changed just now and this state is not cached: the present one
            return decide(choice).pick
        got = _picks[key] = dec.pick
    return got


def clear_memo() -> None:
    """Forget the in-process decisions (the next :func:`decide` reads the cache file again)."""
    _memo.clear()
    _picks.clear()
    _sample[:] = [None, -1.0, None]

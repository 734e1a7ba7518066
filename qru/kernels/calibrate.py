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

``qru doctor`` prints the machine, every choice, why, and the cache path.

Choices:

- ``dense_fp32``: the fp32 CPU GEMMs with gradients (``qru.kernels.dense``, taken by
  :func:`qru.kernels.linear.linear`): oneDNN (``mkldnn._linear_pointwise``) or torch's ``mm`` (MKL's
  sgemm). On AMD CPUs MKL runs its AVX2 path and oneDNN wins by about 2x; on Intel both reach the
  same roofline.
- ``packed_fp32``: the fp32 CPU linears without gradients (:func:`qru.kernels.linear.linear`):
  oneDNN with a weight packed once, or ``F.linear``.

oneDNN is picked only when it is at least ``MARGIN`` faster: torch's own path is the default.
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

from qru.kernels.machine import describe

CACHE_VERSION = 1
MARGIN = 0.05  # oneDNN must be this much faster to be chosen over torch's default path


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


def _paired_seconds(fns: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
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


# choice -> (candidates, default, probe, is the non-default candidate usable here)
CHOICES: dict[str, tuple[tuple[str, ...], str, Callable[[], dict[str, float]], Callable[[], bool]]] = {
    "dense_fp32": (("onednn", "torch"), "torch", _probe_dense, onednn_available),
    "packed_fp32": (("onednn", "torch"), "torch", _probe_packed,
                    lambda: onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
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


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        return Decision(choice, default, "unavailable", "the alternative is not available in this torch build")
    secs = probe()
    other = next(c for c in cands if c != default)
    faster = secs[other] < secs[default] * (1 - MARGIN)
    pick = other if faster else default
    why = (f"{other} {secs[other] * 1e3:.1f} ms vs {default} {secs[default] * 1e3:.1f} ms on the probe: "
           + (f"{other} is {secs[default] / secs[other]:.2f}x faster" if faster
              else f"{other} is not at least {MARGIN:.0%} faster, keep {default}"))
    return Decision(choice, pick, "measured", why, secs)


_memo: dict[tuple[str, str], Decision] = {}


def decide(choice: str, threads: int | None = None, recalibrate: bool = False) -> Decision:
    """The pick for ``choice`` on this machine at ``threads`` torch threads (default: the current
    count): override, else cache, else measured now (and cached)."""
    if choice not in CHOICES:
        raise ValueError(f"unknown calibration choice {choice!r} (known: {', '.join(CHOICES)})")
    forced = override(choice)
    if forced is not None:
        return Decision(choice, forced, "override", f"QRU_{choice.upper()}={forced}")
    threads = torch.get_num_threads() if threads is None else threads
    key, fields = machine_key(threads)
    if not recalibrate and (key, choice) in _memo:
        return _memo[(key, choice)]
    path = cache_root() / f"{key}.json"
    data = None if recalibrate else _read_cache(path, key)
    if data is not None and choice in data.get("choices", {}):
        d = data["choices"][choice]
        dec = Decision(choice, d["pick"], "cache", d["why"], d.get("seconds", {}))
    else:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            dec = measure(choice)
        finally:
            torch.set_num_threads(old)
        data = data or {"version": CACHE_VERSION, "key": key, "machine": fields, "choices": {}}
        data["choices"][choice] = {k: v for k, v in asdict(dec).items() if k in ("pick", "why", "seconds")}
        _write_cache(path, data)
    _memo[(key, choice)] = dec
    _picks.pop((choice, threads), None)
    return dec


_picks: dict[tuple[str, int], str] = {}  # (choice, threads) -> pick: the per-call fast path of pick()


def pick(choice: str) -> str:
    """Just the pick of :func:`decide` at the current thread count (memoised per process; an
    override is read on every call). Cheap: the linear dispatch asks on every call."""
    forced = override(choice)
    if forced is not None:
        return forced
    key = (choice, torch.get_num_threads())
    got = _picks.get(key)
    if got is None:
        got = _picks[key] = decide(choice).pick
    return got


def clear_memo() -> None:
    """Forget the in-process decisions (the next :func:`decide` reads the cache file again)."""
    _memo.clear()
    _picks.clear()

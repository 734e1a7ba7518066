"""Backend selection and the C++ extension loader shared by every op.

Each op has exactly one dispatch point that calls :func:`backend_for` at call time
(never at import time): CUDA tensors go to Triton, CPU tensors go to the C++
extension built from ``csrc/`` and fall back to the pure-torch reference when no
compiler is available. ``QRU_BACKEND=triton|cpp|torch`` forces a path.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

BACKENDS = ("triton", "cpp", "torch")
CSRC = Path(__file__).resolve().parents[2] / "csrc"


def forced_backend() -> str | None:
    """The backend named by ``QRU_BACKEND``, or None. Raises on an unknown name."""
    name = os.environ.get("QRU_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"QRU_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_usable(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1``."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def backend_for(t: torch.Tensor, cpp: str | None = None) -> str:
    """Pick the backend for an op whose main input is ``t``.

    ``cpp`` names the op's C++ source (``csrc/{cpp}.cpp``), or None when the op
    has no C++ kernel. Unforced, a CPU op whose extension cannot be built falls
    back to ``"torch"``; forced (``QRU_BACKEND``), an unusable backend raises.
    """
    forced = forced_backend()
    if forced == "triton" and not triton_usable(t):
        raise RuntimeError("QRU_BACKEND=triton needs a CUDA tensor or TRITON_INTERPRET=1")
    if forced == "cpp":
        if t.is_cuda:
            raise RuntimeError("QRU_BACKEND=cpp needs CPU tensors")
        if cpp is None or load_cpp_ext(cpp) is None:
            raise RuntimeError(f"QRU_BACKEND=cpp but the C++ kernel {cpp!r} is unavailable")
    if forced is not None:
        return forced
    if t.is_cuda:
        return "triton"
    if cpp is not None and load_cpp_ext(cpp) is not None:
        return "cpp"
    return "torch"


def _common_header_tag() -> str:
    """A short hash of ``csrc/qru_common.h``. torch versions a JIT build by its sources and flags,
    not by the headers they include, so the tag goes into the flags: editing the header rebuilds."""
    import hashlib

    h = CSRC / "qru_common.h"
    return hashlib.sha1(h.read_bytes()).hexdigest()[:12] if h.exists() else "none"


@functools.lru_cache(maxsize=None)
def load_cpp_ext(name: str):
    """Build (once, cached by torch under ``TORCH_EXTENSIONS_DIR``) and load ``csrc/{name}.cpp``,
    which registers its ops with ``TORCH_LIBRARY(qru_{name}, ...)``; returns the op namespace
    ``torch.ops.qru_{name}`` (call ``load_cpp_ext("lora").rowdot(...)``, keywords and defaults as
    in the schema). Returns None, with a warning, when it cannot be built (no compiler, no
    ninja, no source)."""
    src = CSRC / f"{name}.cpp"
    if not src.exists():
        warnings.warn(f"qru: C++ source {src} not found; using the torch reference for {name!r}")
        return None
    try:
        from torch.utils.cpp_extension import load

        # torch adds -std=c++20; no pybind11 / torch/extension.h, so a file builds in seconds
        flags = ["-O3", "-fopenmp", "-march=native", f"-DQRU_COMMON_TAG={_common_header_tag()}"]
        load(
            name=f"qru_{name}_cpu",
            sources=[str(src)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            is_python_module=False,
            verbose=False,
        )
        return getattr(torch.ops, f"qru_{name}")
    except Exception as exc:  # no compiler, no ninja, a build error
        warnings.warn(
            f"qru: could not build the C++ kernel {src.name} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}); "
            f"falling back to the torch reference"
        )
        return None

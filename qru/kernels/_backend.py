"""Backend selection and the C++ extension loader shared by every op.

Each op has exactly one dispatch point that calls :func:`backend_for` at call time
(never at import time): CUDA tensors go to Triton, CPU tensors go to the C++
extension built from ``qru/csrc/`` and fall back to the pure-torch reference when it
cannot be built. ``QRU_BACKEND=triton|cpp|torch`` forces a path.

"Cannot be built" has two causes, kept apart: no toolchain (:func:`missing_toolchain`: no C++
compiler or no ninja; the expected state of a machine without one) and a build that failed
(:func:`build_error`; a bug, which the test suite fails on). Both fall back with a one-line
warning naming the source file.

Extensions are cached by torch under ``TORCH_EXTENSIONS_DIR``, one directory per
:func:`ext_name`, which carries the CPU's instruction set and a hash of its flags (the code is
built with ``-march=native``: a cache shared between CPUs never runs an illegal instruction) and
of the source directory (two checkouts never rebuild each other's extensions). Builders of one
extension take a file lock (``flock``, released by the kernel when a builder dies), so a
torch ``lock`` file that no live builder holds is stale and removed instead of waited on forever.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from qru.kernels import machine

BACKENDS = ("triton", "cpp", "torch")
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def forced_backend() -> str | None:
    """The backend named by ``QRU_BACKEND``, or None. Raises on an unknown name."""
    name = os.environ.get("QRU_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"QRU_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_usable(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` (read at call time;
    the kernels are decorated with :func:`qru.kernels._triton_io.jit`, which honours it per launch)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def backend_for(t: torch.Tensor, cpp: str | None = None) -> str:
    """Pick the backend for an op whose main input is ``t``.

    ``cpp`` names the op's C++ source (``qru/csrc/{cpp}.cpp``), or None when the op
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


# -- the C++ build ---------------------------------------------------------------------------

def missing_toolchain() -> str | None:
    """What is missing to build the C++ kernels (the C++ compiler, ``$CXX`` or ``c++``, or
    ``ninja``), or None when both are on the PATH."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0] if cxx.strip() else "c++") is None:
        return f"C++ compiler {cxx!r}"
    try:
        subprocess.run(["ninja", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "ninja"
    return None


def _common_header_tag() -> str:
    """A short hash of the shared headers ``qru/csrc/*.h``. torch versions a JIT build by its sources
    and flags, not by the headers they include, so the tag goes into the flags: editing a header rebuilds."""
    hs = sorted(CSRC.glob("*.h"))
    h = hashlib.sha1()
    for f in hs:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12] if hs else "none"


def ext_name(name: str) -> str:
    """The extension (and build directory) name of ``qru/csrc/{name}.cpp`` on this machine, e.g.
    ``qru_lora_avx2_0123456789``: the CPU's instruction-set level, then a hash of the CPU's flags
    (the code is built with ``-march=native``), of the source directory and of the torch and Python
    versions."""
    flags = " ".join(sorted(machine.cpu_flags()))
    key = f"{CSRC}|{flags}|{torch.__version__}|{sys.version_info[:2]}"
    return f"qru_{name}_{machine.isa_level()}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def build_dir(name: str) -> Path:
    """The build directory of ``qru/csrc/{name}.cpp``: ``$TORCH_EXTENSIONS_DIR`` (or torch's
    default root) / :func:`ext_name`."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / ext_name(name)


@contextlib.contextmanager
def builder_lock(directory: Path):
    """Hold the builders' lock of ``directory`` (waiting for a live builder), and remove a torch
    ``lock`` file found there: holding the lock, no live builder can own it, so a killed build left
    it (torch would wait on it forever)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "qru.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                warnings.warn(f"qru: removing the stale build lock {stale} (no live builder holds it)")
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_ERRORS: dict[str, str] = {}
_LOADED: dict[str, object] = {}


def loaded_cpp_ext(name: str):
    """The op namespace of ``qru/csrc/{name}.cpp`` if :func:`load_cpp_ext` has loaded it, else None
    (never builds)."""
    return _LOADED.get(name)


def build_error(name: str) -> str | None:
    """Why the last build of ``qru/csrc/{name}.cpp`` failed (a toolchain was there), or None."""
    return _ERRORS.get(name)


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # a compiler's first "error:" line names the culprit; torch's own message ends the text
    errs = [ln for ln in lines if "error:" in ln]
    return errs[0] if errs else (lines[-1] if lines else type(exc).__name__)


@functools.lru_cache(maxsize=None)
def load_cpp_ext(name: str):
    """Build (once, cached by torch under ``TORCH_EXTENSIONS_DIR``, see :func:`build_dir`) and load
    ``qru/csrc/{name}.cpp``, which registers its ops with ``TORCH_LIBRARY(qru_{name}, ...)``; returns
    the op namespace ``torch.ops.qru_{name}`` (call ``load_cpp_ext("lora").rowdot(...)``, keywords and
    defaults as in the schema). Returns None, with a one-line warning naming the file, when there is
    no toolchain (:func:`missing_toolchain`) or the build fails (:func:`build_error` says why)."""
    src = CSRC / f"{name}.cpp"
    missing = missing_toolchain()
    if missing is not None:
        warnings.warn(f"qru: no {missing} to build the C++ kernel {src.name}; using the torch reference")
        return None
    try:
        if not src.exists():
            raise FileNotFoundError(f"C++ source {src} not found")
        from torch.utils.cpp_extension import load

        # torch adds -std=c++20; no pybind11 / torch/extension.h, so a file builds in seconds. OpenMP:
        # libgomp, the one torch loaded (same soname), whose pool a loop joins on a quiet machine
        flags = ["-O3", "-fopenmp", "-march=native", f"-DQRU_COMMON_TAG={_common_header_tag()}"]
        d = build_dir(name)
        with builder_lock(d):
            load(name=ext_name(name), sources=[str(src)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                 extra_include_paths=[str(CSRC)], build_directory=str(d), is_python_module=False, verbose=False)
        _ERRORS.pop(name, None)
        _LOADED[name] = getattr(torch.ops, f"qru_{name}")
        return _LOADED[name]
    except Exception as exc:  # a build error (or a missing source file)
        _ERRORS[name] = f"{type(exc).__name__}: {_last_line(exc)}"
        warnings.warn(f"qru: the C++ kernel {src.name} failed to build ({_ERRORS[name]}); "
                      f"falling back to the torch reference")
        return None


class KernelBuild:
    """Build the C++ kernels ``queues`` names in background threads (one per queue, each in its
    order) while the caller computes; the ops then just load the built modules (any other kernel
    builds on first use). Nothing starts on CUDA or when ``QRU_BACKEND`` forces another backend."""

    def __init__(self, queues: tuple[tuple[str, ...], ...], skip: tuple[str, ...] = ()):
        self.seconds: float | None = None
        self.error: str | None = None
        self.each: dict[str, float] = {}
        self.threads: list[threading.Thread] = []
        self._t0 = time.perf_counter()
        if not torch.cuda.is_available() and forced_backend() in (None, "cpp"):
            for q in queues:
                q = tuple(n for n in q if n not in skip)
                t = threading.Thread(target=self._build, args=(q,), name="qru-kernel-build", daemon=True)
                t.start()
                self.threads.append(t)

    def _build(self, names):
        try:
            for n in names:
                if (CSRC / f"{n}.cpp").exists():
                    t = time.perf_counter()
                    load_cpp_ext(n)
                    self.each[n] = round(time.perf_counter() - t, 1)
        except Exception as e:  # the ops fall back to the torch reference themselves
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = round(time.perf_counter() - self._t0, 1)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def wait(self, log: Callable[[str], None] | None = None) -> None:
        """Join the builders (``log`` says so first when they are still running)."""
        if self.running and log is not None:
            log("waiting for the C++ kernel build to finish ...")
        for t in self.threads:
            t.join()


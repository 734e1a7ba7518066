"""The Triton decorator every qru kernel uses (:func:`jit`), and load/store helpers that convert
to and from fp32 exactly as torch does.

bf16 travels as int16 bits and is widened / rounded by hand: the Triton interpreter's
fp32 -> bf16 cast is not round-to-nearest-even (about half of random values come out
wrong, TRITON 3.x), and doing it by hand costs a few integer ops on GPU. The rounding
is torch's: ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``, NaN -> 0x7FC0.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


# Triton's own library (tl.sum, tl.cdiv, ...) is decorated when triton is imported: imported with the
# interpreter off, it holds compiled-mode functions that an interpreted kernel cannot call.
_STDLIB = (tl, tl.core, tl.standard, tl.math, tl.random, tl.tensor)
_INTERPRETED: dict[int, InterpretedFunction] = {}


@contextlib.contextmanager
def _interpreted_stdlib():
    """Within the block Triton's library functions are interpreted ones (restored afterwards);
    nothing changes when triton was imported with ``TRITON_INTERPRET=1``."""
    swapped = []
    for owner in _STDLIB:
        for name, v in list(vars(owner).items()):
            if isinstance(v, JITFunction) and not isinstance(v, _Kernel):
                f = _INTERPRETED.get(id(v))
                if f is None:
                    f = _INTERPRETED[id(v)] = InterpretedFunction(v.fn)
                swapped.append((owner, name, v))
                setattr(owner, name, f)
    try:
        yield
    finally:
        for owner, name, v in swapped:
            setattr(owner, name, v)


class _Kernel(JITFunction):
    """A :class:`triton.JITFunction` that runs under Triton's interpreter whenever
    ``TRITON_INTERPRET=1`` holds at launch (or at a device-function call), not only when it held at
    import: ``triton.jit`` decides once, when the module is imported, so setting the variable after
    ``import qru.kernels...`` would otherwise leave compiled kernels that cannot run on CPU tensors."""

    def _interpreted(self) -> InterpretedFunction:
        f = self.__dict__.get("_qru_interpreted")
        if f is None:
            f = self._qru_interpreted = InterpretedFunction(self.fn, **self._qru_kwargs)
        return f

    def run(self, *args, grid, warmup, **kwargs):
        if knobs.runtime.interpret:
            with _interpreted_stdlib():
                return self._interpreted().run(*args, grid=grid, warmup=warmup, **kwargs)
        return super().run(*args, grid=grid, warmup=warmup, **kwargs)

    def __call__(self, *args, **kwargs):
        if knobs.runtime.interpret:  # a device-function call inside an interpreted kernel
            return self._interpreted()(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def jit(fn=None, **kwargs):
    """``triton.jit`` (same keywords) whose choice between compiling and interpreting is made at each
    launch from ``TRITON_INTERPRET``, whatever the import order (see :class:`_Kernel`)."""
    def wrap(f):
        k = _Kernel(f, **kwargs)
        k._qru_kwargs = kwargs
        return k

    return wrap(fn) if fn is not None else wrap


def row_block(V: int) -> int:
    """The column tile of a one-program-per-row kernel over ``V`` columns: on the GPU
    :func:`gpu_row_block`; under the interpreter 64, so test rows span several (partial) tiles.
    Tests run the GPU tile under the interpreter too, through the launchers' ``block_v``."""
    return 64 if knobs.runtime.interpret else gpu_row_block(V)


def gpu_row_block(V: int) -> int:
    """The GPU's column tile: the whole row up to 4096 columns, else 4096-wide tiles."""
    return min(4096, triton.next_power_of_2(max(V, 1)))


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor to hand a kernel that uses :func:`load_f32` / :func:`store_f32`
    (bf16 is reinterpreted as int16)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@jit
def load_f32(ptr, offs, mask, IN_BF16: tl.constexpr):
    """Load elements as fp32 (masked lanes read 0). ``IN_BF16``: ``ptr`` holds bf16 bits as int16."""
    if IN_BF16:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@jit
def row_logsumexp(base, V, BLOCK_V: tl.constexpr, IN_BF16: tl.constexpr):
    """``log Σ_v exp(x_v)`` of the row ``base[0:V]`` in fp32: an online max / rescaled sum over blocks."""
    offs = tl.arange(0, BLOCK_V)
    x = tl.where(offs < V, load_f32(base, offs, offs < V, IN_BF16), float("-inf"))
    m = tl.max(x, 0)
    s = tl.sum(tl.exp(x - m), 0)
    for start in range(BLOCK_V, V, BLOCK_V):
        o = start + offs
        x = tl.where(o < V, load_f32(base, o, o < V, IN_BF16), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    return m + tl.log(s)


@jit
def store_f32(ptr, offs, v, mask, OUT_BF16: tl.constexpr):
    """Store fp32 ``v`` rounded to the destination dtype (``OUT_BF16``: int16 bits of bf16)."""
    if OUT_BF16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)

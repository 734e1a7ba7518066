"""Counter-based dropout for the LoRA path: one 64-bit seed per call, then a hash of (row, column)
per element, so every kernel that needs the mask recomputes it instead of storing it.

With ``k0``/``k1`` the low and high 32 bits of the seed and ``h`` = lowbias32 (C. Wellons, uint32
arithmetic)::

    rowh[m] = h(m ^ k1),  colh[n] = h(n ^ k0),  dropped = h(colh[n] + rowh[m] mod 2³²) >> 16 < thr

with ``thr = round(p·65536)``. :func:`hash_drop_reference` is the torch-ops oracle; csrc/lora.cpp
computes the same bits in C++, and :func:`hash_dropped` in Triton (the tile function the LoRA
kernels of :mod:`qru.kernels.lora_triton` call; :func:`hash_drop_triton` writes its mask).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qru.kernels._backend import forced_backend, load_cpp_ext

# Dropout draws 16-bit uniforms: the drop probability is rounded to a multiple of 1/65536.
DROP_LEVELS = 65536


_M32 = 0xFFFFFFFF


def _mul32_(t: torch.Tensor, c: int, tmp: torch.Tensor) -> torch.Tensor:
    """``t ← t·c mod 2³²`` in place, for int64 ``t`` in [0, 2³²): in 16-bit halves of ``c`` so
    no product overflows int64."""
    torch.mul(t, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return t.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_M32)


def _lowbias32_(t: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """C. Wellons' lowbias32 integer hash, in place on uint32 values held in int64."""
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        t.bitwise_xor_(torch.bitwise_right_shift(t, shift, out=tmp))
        _mul32_(t, mul, tmp)
    return t.bitwise_xor_(torch.bitwise_right_shift(t, 16, out=tmp))


def hash_drop_reference(rows: int, cols: int, seed: torch.Tensor, thr: int) -> torch.Tensor:
    """The counter-based drop-mask (bool, rows × cols) in torch ops: with ``k0``/``k1`` the low and
    high 32 bits of ``seed`` (int64, 0-dim, on the mask's device)::

        rowh[m] = h(m ^ k1),  colh[n] = h(n ^ k0),  dropped = h(colh[n] + rowh[m] mod 2³²) >> 16 < thr

    ``h`` = lowbias32, uint32 arithmetic. csrc/lora.cpp computes the same bits on the fly
    (forward and backward). Here in int64 tensors, in place, a few rows at a time."""
    dev = seed.device
    rowh = torch.arange(rows, device=dev).bitwise_xor_((seed >> 32) & _M32)
    colh = torch.arange(cols, device=dev).bitwise_xor_(seed & _M32)
    _lowbias32_(rowh, torch.empty_like(rowh))
    _lowbias32_(colh, torch.empty_like(colh))
    out = torch.empty((rows, cols), dtype=torch.bool, device=dev)
    step = max(1, (1 << 18) // max(cols, 1))
    t = torch.empty((min(step, rows), cols), dtype=torch.int64, device=dev)
    tmp = torch.empty_like(t)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        tt = torch.add(rowh[r0:r0 + n, None], colh[None, :], out=t[:n]).bitwise_and_(_M32)
        _lowbias32_(tt, tmp[:n]).bitwise_right_shift_(16)
        torch.lt(tt, thr, out=out[r0:r0 + n])
    return out


def drop_params(p: float, device, generator: torch.Generator | None = None):
    """``(seed, thr, keep)`` for one dropout draw: ``seed`` a 0-dim int64 tensor on ``device``
    (one 64-bit draw from ``generator``), ``thr = round(p·65536)`` (0: no dropout) and the keep
    rescale ``1/(1-p')``, ``p' = thr/65536``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    thr = int(round(p * DROP_LEVELS))
    if thr == 0:
        return None, 0, 1.0
    seed = torch.empty((), dtype=torch.int64, device=device).random_(-(2 ** 63), None, generator=generator)
    return seed, thr, DROP_LEVELS / (DROP_LEVELS - thr)


def hash_drop(rows: int, cols: int, seed: torch.Tensor, thr: int) -> torch.Tensor:
    """The drop-mask of :func:`hash_drop_reference`, by the C++ kernel on CPU when it is built, by
    the Triton hash on CUDA."""
    if forced_backend() != "torch":
        if seed.device.type == "cuda":
            return hash_drop_triton(rows, cols, seed, thr)
        if seed.device.type == "cpu":
            ext = load_cpp_ext("lora")
            if ext is not None:
                return ext.drop_mask(rows, cols, int(seed), thr)
    return hash_drop_reference(rows, cols, seed, thr)


def sample_drop(shape, p: float, device, generator: torch.Generator | None = None):
    """A drop-mask (bool, ``shape``, True = dropped) and the keep rescale ``1/(1-p')``.

    Counter-based: one 64-bit seed from ``generator``, then a hash of (row, column) per element
    (rows = the flattened leading dims), compared with ``p' = round(p·65536)/65536``."""
    seed, thr, keep = drop_params(p, device, generator)
    if thr == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device), 1.0
    cols = shape[-1] if len(shape) else 1
    rows = math.prod(shape[:-1]) if len(shape) else 1
    return hash_drop(rows, cols, seed, thr).view(shape), keep


@triton.jit
def _lowbias32(x):
    """lowbias32 on uint32 (wrapping products), as :func:`_lowbias32_` and csrc/lora.cpp."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def hash_dropped(rows, cols, seed_ptr, thr):
    """The drop-mask tile (bool, rows × cols) of :func:`hash_drop_reference` for int64 row and
    column indices: the 64-bit seed is read from ``seed_ptr`` (no host sync), nothing is stored."""
    s = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    k0 = s.to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    rowh = _lowbias32(rows.to(tl.uint32) ^ k1)
    colh = _lowbias32(cols.to(tl.uint32) ^ k0)
    h = _lowbias32(rowh[:, None] + colh[None, :])
    return (h >> 16).to(tl.int32) < thr


@triton.jit
def _hash_mask_kernel(o_ptr, R, C, seed_ptr, thr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Writes the drop-mask (uint8) of :func:`hash_dropped`; for tests and an explicit mask."""
    rr = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cc = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    d = hash_dropped(rr, cc, seed_ptr, thr)
    tl.store(o_ptr + rr[:, None] * C + cc[None, :], d.to(tl.uint8), mask=(rr < R)[:, None] & (cc < C)[None, :])


def hash_drop_triton(rows: int, cols: int, seed: torch.Tensor, thr: int) -> torch.Tensor:
    """The drop-mask of :func:`hash_drop_reference` computed by the Triton hash that the LoRA
    kernels use in place (CUDA, or the interpreter)."""
    out = torch.empty((rows, cols), dtype=torch.uint8, device=seed.device)
    if rows and cols:
        grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
        _hash_mask_kernel[grid](out, rows, cols, seed.reshape(1), int(thr), BLOCK_R=32, BLOCK_C=32)
    return out.view(torch.bool)

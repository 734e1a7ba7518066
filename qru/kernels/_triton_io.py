"""Triton load/store helpers that convert to and from fp32 exactly as torch does.

bf16 travels as int16 bits and is widened / rounded by hand: the Triton interpreter's
fp32 -> bf16 cast is not round-to-nearest-even (about half of random values come out
wrong, TRITON 3.x), and doing it by hand costs a few integer ops on GPU. The rounding
is torch's: ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``, NaN -> 0x7FC0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor to hand a kernel that uses :func:`load_f32` / :func:`store_f32`
    (bf16 is reinterpreted as int16)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@triton.jit
def load_f32(ptr, offs, mask, IN_BF16: tl.constexpr):
    """Load elements as fp32 (masked lanes read 0). ``IN_BF16``: ``ptr`` holds bf16 bits as int16."""
    if IN_BF16:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
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


@triton.jit
def store_f32(ptr, offs, v, mask, OUT_BF16: tl.constexpr):
    """Store fp32 ``v`` rounded to the destination dtype (``OUT_BF16``: int16 bits of bf16)."""
    if OUT_BF16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)

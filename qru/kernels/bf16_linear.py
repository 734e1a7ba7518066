"""Inference linear for bf16 on CPUs: decoding's skinny GEMMs (few rows of ``x``) in C++.

Same math as a bf16 GEMM: ``y = round_bf16(x Wᵀ + b)`` with exact bf16 products and fp32
accumulation, by

* ``"cpp"`` (``csrc/bf16_linear.cpp``) for few rows of ``x`` (``M <= skinny_rows()``): each weight
  row is read once per call, with software prefetch, and multiplied into every row of ``x``. With
  AVX512-BF16 by ``vdpbf16ps`` on 4 x 4 tiles (impl ``"dpbf16"``), else widened to fp32 in
  registers and FMA'd (``"fma"``, AVX2), else ``"scalar"``. On AVX512-BF16 CPUs torch's oneDNN
  bf16 GEMM reads a cold weight at ~12-17 GB/s for such shapes; the kernel at ~20-30 GB/s;
* more rows: torch's bf16 GEMM where the CPU multiplies bf16 natively, else an fp32 GEMM on the
  widened operands, rounded once to bf16 (torch's own bf16 GEMM converts and is several times
  slower there).

Inference only (no autograd): the one linear dispatch (:func:`qru.kernels.linear.linear`) calls
:func:`bf16_linear` for bf16 CPU operands without gradients. Elsewhere (CUDA, gradients, other
dtypes, autocast) :func:`bf16_linear` is ``F.linear``, the reference.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qru.kernels._backend import forced_backend, load_cpp_ext

SKINNY_ROWS = 16
NATIVE_SKINNY_ROWS = 8  # with AVX512-BF16 the kernel's vdpbf16ps tiles beat oneDNN up to ~8-12 rows


@functools.lru_cache(maxsize=None)
def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bf16 natively (torch's bf16 GEMM is then the fast path)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def bf16_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and not torch.is_grad_enabled() and forced_backend() != "torch"
            and not torch.is_autocast_enabled("cpu"))


def skinny_rows() -> int:
    """Most rows of ``x`` the C++ kernel takes: beyond it a GEMM wins (native bf16: torch's)."""
    return NATIVE_SKINNY_ROWS if native_bf16_cpu() else SKINNY_ROWS


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for bf16 CPU inference, computed as described above."""
    if not applies(x, weight) or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    ext = load_cpp_ext("bf16_linear") if rows <= skinny_rows() else None
    if ext is not None:
        y = ext.skinny_linear(x2.contiguous(), weight.contiguous(), bias)
    elif native_bf16_cpu():
        return F.linear(x, weight, bias)
    else:
        y = F.linear(x2.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    return y.view(*lead, weight.shape[0])

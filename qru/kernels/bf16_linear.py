"""Inference linear for bf16 on CPUs without native bf16 matmul (no AVX512-BF16 / AMX).

There, torch's bf16 GEMM converts its operands and runs several times slower than fp32. Same
math, faster: ``y = round_bf16(x Wᵀ + b)`` with exact bf16 -> fp32 widening and fp32
accumulation (what a bf16 GEMM computes), by

* ``"cpp"`` (``csrc/bf16_linear.cpp``) for few rows of ``x`` (decoding: ``M <= SKINNY_ROWS``): each
  weight row is read once, widened in registers and multiplied into up to 8 rows of ``x``;
* an fp32 GEMM on the widened operands, rounded once to bf16, for more rows (prefill).

Inference only (no autograd): :func:`bf16_linear` is called under ``torch.no_grad``;
:func:`fast_linears` swaps it into a model's bf16 ``nn.Linear`` modules for the duration of a
``with`` block (``qru.model.generate`` does this). Elsewhere (CUDA, native-bf16 CPUs, gradients,
other dtypes) it is ``F.linear``, the reference.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from qru.kernels._backend import forced_backend, load_cpp_ext, plain_cpu_linears, rerouted

SKINNY_ROWS = 16


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
            and not torch.is_grad_enabled() and not native_bf16_cpu() and forced_backend() != "torch"
            and not torch.is_autocast_enabled("cpu"))


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for bf16 CPU inference, computed as described above."""
    if not applies(x, weight) or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    ext = load_cpp_ext("bf16_linear") if x2.shape[0] <= SKINNY_ROWS else None
    if ext is not None:
        y = ext.skinny_linear(x2.contiguous(), weight.contiguous(), bias)
    else:
        y = F.linear(x2.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    return y.view(*lead, weight.shape[0])


@contextlib.contextmanager
def fast_linears(model: nn.Module):
    """Within the block, every plain bf16 ``nn.Linear`` of ``model`` runs :func:`bf16_linear`
    (a no-op where it would not apply). Restores the modules' own forward afterwards."""
    mods = [] if native_bf16_cpu() else plain_cpu_linears(model, torch.bfloat16)
    with rerouted(mods, lambda m: functools.partial(_forward, m)):
        yield model


def _forward(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return bf16_linear(x, m.weight, m.bias)

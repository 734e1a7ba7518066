"""Fused SwiGLU gate: ``out = round(silu(g)) ⊙ u`` (the Llama MLP's ``F.silu(gate(x)) * up(x)``).

``round`` is the cast to the inputs' dtype that ``F.silu`` returns; a no-op in fp32. Math in
fp32. One public entry, :func:`swiglu`: ``"triton"`` (CUDA, or forced under
``TRITON_INTERPRET=1``), ``"cpp"`` (CPU, ``csrc/llama_ops.cpp``, AVX2), ``"torch"``: the
reference :func:`swiglu_reference` under plain autograd. Fused for fp32 / bf16 inputs of one
dtype and shape; anything else runs the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels._triton_io import jit, kernel_view, load_f32, store_f32
from qru.kernels.rmsnorm import _round_bf16

BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, o_ptr, n, BLOCK: tl.constexpr, BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = load_f32(g_ptr, offs, m, BF16)
    u = load_f32(u_ptr, offs, m, BF16)
    s = _round_bf16(g / (1.0 + tl.exp(-g)), BF16)
    store_f32(o_ptr, offs, s * u, m, BF16)


@jit
def _swiglu_bwd_kernel(d_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr, BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d = load_f32(d_ptr, offs, m, BF16)
    g = load_f32(g_ptr, offs, m, BF16)
    u = load_f32(u_ptr, offs, m, BF16)
    sg = 1.0 / (1.0 + tl.exp(-g))
    store_f32(dg_ptr, offs, d * u * (sg * (1.0 + g * (1.0 - sg))), m, BF16)
    store_f32(du_ptr, offs, d * _round_bf16(g * sg, BF16), m, BF16)


def _ext():
    return load_cpp_ext("llama_ops")


class SwiGLUFn(torch.autograd.Function):
    """``out = silu(g) ⊙ u`` with ``silu(g) = g·σ(g)``.

    Backward: ``∂silu/∂g = σ(g) + g·σ(g)(1 - σ(g)) = σ(g)(1 + g(1 - σ(g)))``, so
    ``dg = dout ⊙ u ⊙ σ(g)(1 + g(1 - σ(g)))`` and ``du = dout ⊙ silu(g)``. Saves ``g`` and ``u``
    only (autograd's composite also keeps ``silu(g)``); one pass each way.
    """

    @staticmethod
    def forward(ctx, g, u, backend):
        if backend == "cpp":
            out = _ext().swiglu_fwd(g, u)
        else:
            out = torch.empty_like(g)
            n = g.numel()
            if n:
                _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](kernel_view(g), kernel_view(u), kernel_view(out), n,
                                                             BLOCK=BLOCK, BF16=g.dtype == torch.bfloat16)
        ctx.save_for_backward(g, u)
        ctx.backend = backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d):
        g, u = ctx.saved_tensors
        d = d.contiguous()
        if ctx.backend == "cpp":
            return (*_ext().swiglu_bwd(d, g, u), None)
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](kernel_view(d), kernel_view(g), kernel_view(u),
                                                         kernel_view(dg), kernel_view(du), n, BLOCK=BLOCK,
                                                         BF16=g.dtype == torch.bfloat16)
        return dg, du, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``; equals :func:`swiglu_reference` up to float round-off."""
    if (gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in (torch.float32, torch.bfloat16)
            or gate.device != up.device or gate.numel() == 0):
        return swiglu_reference(gate, up)
    backend = backend_for(gate, cpp="llama_ops")
    if backend == "torch":
        return swiglu_reference(gate, up)
    if backend == "cpp" and not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return _ext().swiglu_fwd(gate.contiguous(), up.contiguous())  # no graph: no Function
    return SwiGLUFn.apply(gate.contiguous(), up.contiguous(), backend)


def swiglu_halves(gate_up: torch.Tensor) -> torch.Tensor:
    """``swiglu(*gate_up.chunk(2, -1))``: the gate and up projections side by side in one tensor (a
    fused projection's output). Without a graph to build on CPU, one C++ pass over the halves in
    place (no copies of them); otherwise :func:`swiglu` of the two halves."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_halves: last dim of gate_up {tuple(gate_up.shape)} must be even")
    if (gate_up.dtype in (torch.float32, torch.bfloat16) and gate_up.device.type == "cpu" and gate_up.numel()
            and gate_up.stride(-1) == 1 and not (torch.is_grad_enabled() and gate_up.requires_grad)
            and backend_for(gate_up, cpp="llama_ops") == "cpp"):
        x2 = gate_up if gate_up.dim() == 2 else gate_up.reshape(-1, gate_up.shape[-1])
        return _ext().swiglu_halves_fwd(x2).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return swiglu(*gate_up.chunk(2, dim=-1))

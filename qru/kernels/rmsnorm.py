"""Fused RMSNorm: ``y = w ⊙ round(x · rstd)``, ``rstd = 1/sqrt(mean(x²) + eps)``, fp32 math.

``round`` is the cast back to ``x``'s dtype that qru's (and HF's) RMSNorm does before the
weight multiply; a no-op in fp32. One public entry, :func:`rms_norm`, picks the backend at call
time: ``"triton"`` (CUDA, or ``QRU_BACKEND=triton`` with ``TRITON_INTERPRET=1``), ``"cpp"`` (CPU,
``csrc/llama_ops.cpp``: one pass forward, one backward, AVX2), ``"torch"``: the reference
composite :func:`rms_norm_reference` under plain autograd. The fused paths take fp32 or bf16
``x`` with a weight of the same dtype; any other combination runs the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels._triton_io import jit, kernel_view, load_f32, store_f32

FUSED_DTYPES = (torch.float32, torch.bfloat16)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The oracle (qru.model.llama's original RMSNorm, = HF LlamaRMSNorm)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@jit
def _round_bf16(v, BF16: tl.constexpr):
    """v rounded to bf16 (nearest even) and widened back; identity for fp32 tensors."""
    if BF16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return v


@jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, r_ptr, H, eps, BLOCK: tl.constexpr, BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    x = load_f32(x_ptr + row * H, offs, m, BF16)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    w = load_f32(w_ptr, offs, m, BF16)
    store_f32(y_ptr + row * H, offs, w * _round_bf16(x * r, BF16), m, BF16)
    tl.store(r_ptr + row, r)


@jit
def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, dwp_ptr, N, H, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    BF16: tl.constexpr):
    """ROWS rows per program; the program's dw partial goes to row ``pid`` of ``dwp``."""
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    w = load_f32(w_ptr, offs, m, BF16)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        mr = m & (offs * 0 + row < N)
        dy = load_f32(dy_ptr + row * H, offs, mr, BF16)
        x = load_f32(x_ptr + row * H, offs, mr, BF16)
        r = tl.sum(tl.load(r_ptr + row + offs, mask=mr & (offs < 1), other=0.0), 0)
        dn = dy * w
        dot = tl.sum(dn * x, 0)
        store_f32(dx_ptr + row * H, offs, r * (dn - x * (r * r * dot / H)), mr, BF16)
        acc += dy * _round_bf16(x * r, BF16)
    tl.store(dwp_ptr + pid * H + offs, acc, mask=m)


def _ext():
    return load_cpp_ext("llama_ops")


class RMSNormFn(torch.autograd.Function):
    """Fused RMSNorm over rows ``x`` (N, H).

    Backward: with ``n = x·r``, ``r = (mean(x²) + eps)^(-1/2)`` and ``y = w ⊙ n``:
    ``∂r/∂x_j = -r³ x_j / H``, so for ``dn = dy ⊙ w``:
    ``dx_j = r·dn_j + Σ_i dn_i x_i ∂r/∂x_j = r·(dn_j - x_j r² mean(dn ⊙ x))``, and
    ``dw = Σ_rows dy ⊙ round(n)`` (the rounded ``n`` the forward multiplied). Saves ``x`` and
    ``r`` (N floats) only.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, backend):
        N, H = x.shape
        if backend == "cpp":
            y, rstd = _ext().rmsnorm_fwd(x, weight, eps)
        else:
            y = torch.empty_like(x)
            rstd = torch.empty(N, device=x.device, dtype=torch.float32)
            if N:
                _rms_fwd_kernel[(N,)](kernel_view(x), kernel_view(weight), kernel_view(y), rstd, H, eps,
                                      BLOCK=triton.next_power_of_2(H), BF16=x.dtype == torch.bfloat16)
        ctx.save_for_backward(x, weight, rstd)
        ctx.backend = backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        N, H = x.shape
        if ctx.backend == "cpp":
            dx, dw = _ext().rmsnorm_bwd(dy, x, weight, rstd)
        else:
            rows = 1 if N <= 64 else 16
            grid = triton.cdiv(N, rows)
            dx = torch.empty_like(x)
            dwp = torch.zeros((max(grid, 1), H), device=x.device, dtype=torch.float32)
            if N:
                _rms_bwd_kernel[(grid,)](kernel_view(dy), kernel_view(x), kernel_view(weight), rstd, kernel_view(dx),
                                         dwp, N, H, ROWS=rows, BLOCK=triton.next_power_of_2(H),
                                         BF16=x.dtype == torch.bfloat16)
            dw = dwp.sum(0)
        return dx, dw.to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x``; equals :func:`rms_norm_reference` up to float round-off."""
    if (x.dtype != weight.dtype or x.dtype not in FUSED_DTYPES or weight.dim() != 1
            or x.shape[-1] != weight.shape[0] or x.device != weight.device or x.numel() == 0):
        return rms_norm_reference(x, weight, eps)
    backend = backend_for(x, cpp="llama_ops")
    if backend == "torch":
        return rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if backend == "cpp" and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _ext().rmsnorm_fwd(x2, weight.contiguous(), float(eps))[0].view(x.shape)  # no graph: no Function
    return RMSNormFn.apply(x2, weight.contiguous(), float(eps), backend).view(x.shape)

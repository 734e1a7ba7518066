"""Fused rotary position embedding (HF's rotate-half convention) with the head transpose.

For ``x`` laid out (B, T, NH, D) as a projection's output viewed per head, and ``cos``/``sin``
(B, T, D), returns ``x·cos + rotate_half(x)·sin`` laid out (B, NH, T, D) contiguous, i.e.
``apply_rope(x.transpose(1, 2), ...)`` with the transpose copy folded into the one pass:

    out[i]     = x[i] c[i]     - x[i+h] s[i]        (i < h = D/2)
    out[i + h] = x[i+h] c[i+h] + x[i] s[i+h]

Math in fp32; the output dtype is ``promote(x.dtype, cos.dtype)`` as in the composite. One
public entry, :func:`rope`: ``"triton"`` (CUDA, or forced under ``TRITON_INTERPRET=1``),
``"cpp"`` (CPU, ``csrc/llama_ops.cpp``), ``"torch"``: the reference :func:`rope_reference`.
No gradient for ``cos``/``sin`` (positions are not learned).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels._triton_io import jit, kernel_view, load_f32, store_f32

FUSED_DTYPES = (torch.float32, torch.bfloat16)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The oracle: ``x`` (B, T, NH, D) -> (B, NH, T, D), as qru.model.llama's original apply_rope."""
    x = x.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


@jit
def _rope_kernel(x_ptr, sb, st, sh, o_ptr, ob, ot, oh, c_ptr, s_ptr, T, NH, HALF,
                 FWD: tl.constexpr, BLOCK: tl.constexpr, IN_BF16: tl.constexpr, OUT_BF16: tl.constexpr):
    """One program per (b, t): every head of that position. FWD rotates by +angle, else by -angle."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    offs = tl.arange(0, BLOCK)
    m = offs < HALF
    cb = c_ptr + pid * 2 * HALF
    sbp = s_ptr + pid * 2 * HALF
    c1 = tl.load(cb + offs, mask=m, other=0.0)
    c2 = tl.load(cb + HALF + offs, mask=m, other=0.0)
    s1 = tl.load(sbp + offs, mask=m, other=0.0)
    s2 = tl.load(sbp + HALF + offs, mask=m, other=0.0)
    for h in range(NH):
        src = x_ptr + b * sb + t * st + h * sh
        dst = o_ptr + b * ob + t * ot + h * oh
        x1 = load_f32(src, offs, m, IN_BF16)
        x2 = load_f32(src + HALF, offs, m, IN_BF16)
        if FWD:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        else:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        store_f32(dst, offs, o1, m, OUT_BF16)
        store_f32(dst + HALF, offs, o2, m, OUT_BF16)


def _ext():
    return load_cpp_ext("llama_ops")


def _launch(src, src_strides, dst, cos, sin, B, T, NH, D, fwd):
    """src_strides: element strides of src's (b, t, h) dims; dst contiguous in its own layout."""
    if fwd:  # dst (B, NH, T, D)
        ob, ot, oh = NH * T * D, D, T * D
    else:  # dst (B, T, NH, D)
        ob, ot, oh = T * NH * D, NH * D, D
    if B * T:
        _rope_kernel[(B * T,)](kernel_view(src), *src_strides, kernel_view(dst), ob, ot, oh, cos, sin, T, NH, D // 2,
                               FWD=fwd, BLOCK=triton.next_power_of_2(max(D // 2, 1)),
                               IN_BF16=src.dtype == torch.bfloat16, OUT_BF16=dst.dtype == torch.bfloat16)
    return dst


class RoPEFn(torch.autograd.Function):
    """Rotary embedding + (T, NH) transpose.

    Backward: each pair ``(x[i], x[i+h])`` goes through the linear map
    ``[[c_i, -s_i], [s_{i+h}, c_{i+h}]]``, so the gradient is its transpose:
    ``dx[i] = d[i] c[i] + d[i+h] s[i+h]``, ``dx[i+h] = d[i+h] c[i+h] - d[i] s[i]``, laid back out
    as (B, T, NH, D). Saves only ``cos``/``sin`` (fp32, (B, T, D)).
    """

    @staticmethod
    def forward(ctx, x, cos, sin, out_dtype, backend):
        B, T, NH, D = x.shape
        if backend == "cpp":
            out = _ext().rope_fwd(x, cos, sin, out_dtype)
        else:
            out = torch.empty((B, NH, T, D), device=x.device, dtype=out_dtype)
            _launch(x, (x.stride(0), x.stride(1), x.stride(2)), out, cos, sin, B, T, NH, D, True)
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype, ctx.backend = x.dtype, backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        if g.stride(-1) != 1:
            g = g.contiguous()
        B, NH, T, D = g.shape
        if ctx.backend == "cpp":
            dx = _ext().rope_bwd(g, cos, sin, ctx.in_dtype)
        else:
            dx = torch.empty((B, T, NH, D), device=g.device, dtype=ctx.in_dtype)
            _launch(g, (g.stride(0), g.stride(2), g.stride(1)), dx, cos, sin, B, T, NH, D, False)
        return dx, None, None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, NH, D), ``cos``/``sin`` (B, T, D) -> rotated (B, NH, T, D), contiguous when fused."""
    if x.dim() != 4 or cos.shape != (x.shape[0], x.shape[1], x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(f"rope: x {tuple(x.shape)} must be (B, T, NH, D) and cos/sin (B, T, D), got "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    out_dtype = torch.promote_types(x.dtype, cos.dtype)
    if (x.dtype not in FUSED_DTYPES or out_dtype not in FUSED_DTYPES or x.shape[3] % 2 or x.numel() == 0
            or cos.requires_grad or sin.requires_grad or cos.device != x.device):
        return rope_reference(x, cos, sin)
    backend = backend_for(x, cpp="llama_ops")
    if backend == "torch":
        return rope_reference(x, cos, sin)
    if x.stride(-1) != 1:
        x = x.contiguous()
    c = cos.float().contiguous()
    s = sin.float().contiguous()
    if backend == "cpp" and not (torch.is_grad_enabled() and x.requires_grad):
        return _ext().rope_fwd(x, c, s, out_dtype)  # no graph: no Function
    return RoPEFn.apply(x, c, s, out_dtype, backend)

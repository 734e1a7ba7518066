"""Fused fake quantization ``W_q = dequantize(quantize(W))`` with a straight-through gradient.

One pass per block: the block's scale (and zero / min) and each element's code are computed and
the dequantized value written at once; no packed data, scales or codes are stored. Formats and
arithmetic are those of :mod:`qru.kernels.quant4` (nf4, fp4: flat blocks, bitsandbytes' partial
last block), :mod:`qru.kernels.quant_int` (int4 AWQ asymmetric, int4_sym: groups along the last
dimension; int8: per row) and :mod:`qru.kernels.quant_gguf` (q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4:
flat 32-blocks, zero-padded). The result equals ``qru.quant.dequantize(qru.quant.quantize(W,
fmt, block_size))`` bit for bit, in ``W``'s dtype. ``q4_k`` (whose 21-trial fit is not fused)
goes through :func:`quant_gguf.quantize_gguf` then :func:`quant_gguf.dequantize_gguf`.
Double quantization of the nf4/fp4 absmax is not supported.

LoRA mode (:func:`fake_quant_lora`): the kernels form each block's merged values
``W[i, j] + s * sum_k B[i, k] A[k, j]`` (fp32; k ascending, each product and sum rounded) and
fake-quantize them, so the fp32 merged layer ``W + s B A`` is never materialised (except for
``q4_k``). The result is in ``W``'s dtype.

Backends, equal bit for bit: the torch reference (:func:`fake_quant_reference`, which is the
quantize-then-dequantize references composed), Triton kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``) and ``csrc/fake_quant.cpp``. One dispatch point,
:func:`fake_quant_values`, honours ``QRU_BACKEND``.

Gradients (straight-through estimator; derivations in :class:`FakeQuantSTE` and
:class:`FakeQuantLoRASTE`): ``dL/dW = dL/dW_q``; in LoRA mode ``dL/dA = s Bᵀ G`` and
``dL/dB = s G Aᵀ`` with ``G = dL/dW_q``.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from qru.kernels import quant4, quant_gguf, quant_int
from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels._triton_io import jit, kernel_view, load_f32, store_f32
from qru.kernels.quant_gguf_triton import mxfp4_codes, q8_0_codes, q_0_codes, q_1_codes
from qru.kernels.quant_int import int4_asym_codes, rint
from qru.kernels.threads import with_kernel_team

FAKE_QUANT_FORMATS = quant4.FORMATS_4BIT + quant_int.INT_FORMATS + quant_gguf.GGUF_FORMATS
FUSED_FORMATS = tuple(f for f in FAKE_QUANT_FORMATS if f != "q4_k")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INT_KIND = {"int4": 0, "int4_sym": 1, "int8": 2}


def resolve_block_size(fmt: str, block_size: int | None, shape: tuple[int, ...]) -> int | None:
    """Validate ``fmt`` / ``block_size`` for a weight of ``shape`` and return the block (nf4/fp4:
    default 64; int4 formats: the group, default 128; int8: None; GGUF: its fixed block)."""
    if fmt not in FAKE_QUANT_FORMATS:
        raise ValueError(f"fmt must be one of {FAKE_QUANT_FORMATS}, got {fmt!r}")
    if fmt in quant4.FORMATS_4BIT:
        block_size = quant4.DEFAULT_BLOCK_SIZE if block_size is None else block_size
        quant4.check_block_size(block_size)
        return block_size
    if fmt in quant_int.INT_FORMATS:
        if block_size is None and fmt != "int8":
            block_size = quant_int.DEFAULT_GROUP
        quant_int.check_int_args(tuple(shape), fmt, block_size)
        return block_size
    b = quant_gguf.BLOCK[fmt]
    if block_size not in (None, b):
        raise ValueError(f"{fmt} has a fixed block of {b} elements; block_size must be None or {b}, "
                         f"got {block_size!r}")
    return b


def _check_weight(w, name: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} has no elements (shape {tuple(w.shape)}); nothing to fake-quantize")


def _check_lora(w, a, b, scale, name: str) -> None:
    _check_weight(w, name)
    for t, what in ((a, "A"), (b, "B")):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: LoRA {what} must be a bf16/fp16/fp32 tensor")
        if t.device != w.device:
            raise ValueError(f"{name}: LoRA {what} is on {t.device}, the weight on {w.device}")
    if w.dim() != 2 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] \
            or a.shape[0] != b.shape[1]:
        raise ValueError(f"{name}: LoRA shapes must be W [out, in], A [r, in], B [out, r]; got W "
                         f"{tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name}: LoRA scale must be a finite number, got {scale!r}")


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction pass (min and max propagate NaN; ±Inf shows in one of them)."""
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _raise_nonfinite(w: torch.Tensor, fmt: str, name: str) -> None:
    if not bool(torch.isfinite(w).all()):
        idx = tuple(int(i) for i in (~torch.isfinite(w)).nonzero()[0])
        raise ValueError(f"{name} contains NaN or Inf (first at index {idx}); cannot fake-quantize to {fmt}")
    raise ValueError(f"{name}: |w| up to {w.abs().max().item():.3g} overflows {fmt}'s scale; "
                     f"cannot fake-quantize to {fmt}")


# ----------------------------------------------------------------------------- reference


def merge_reference(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 ``W + s B A`` with the kernels' summation: k ascending, products and sums rounded
    one by one (so the fused kernels can match it bit for bit)."""
    af, bf = a.float(), b.float()
    acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for k in range(a.shape[0]):
        acc = acc + bf[:, k:k + 1] * af[k:k + 1, :]
    return w.float() + acc * torch.tensor(scale, dtype=torch.float32, device=w.device)


def fake_quant_reference(w: torch.Tensor, fmt: str, block_size: int | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` by the pure-torch references of the quantizers (what
    ``qru.quant`` runs under ``QRU_BACKEND=torch``), in ``dtype`` (default ``w.dtype``). No
    finiteness check."""
    bs = resolve_block_size(fmt, block_size, tuple(w.shape))
    dtype = w.dtype if dtype is None else dtype
    n = w.numel()
    if fmt in quant4.FORMATS_4BIT:
        packed, absmax = quant4.quantize_4bit_reference(w, fmt, bs)
        return quant4.dequantize_4bit_reference(packed, absmax, fmt, bs, n, dtype).reshape(w.shape)
    if fmt in quant_int.INT_FORMATS:
        data, scales, zeros = quant_int.quantize_int_reference(w, fmt, bs)
        return quant_int.dequantize_int_reference(data, scales, zeros, fmt, tuple(w.shape), bs, dtype)
    data = quant_gguf.quantize_gguf_reference(w, fmt)
    return quant_gguf.dequantize_gguf_reference(data, fmt, n, dtype).reshape(w.shape)


def fake_quant_lora_reference(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, fmt: str,
                              block_size: int | None = None) -> torch.Tensor:
    """The materialised path: :func:`merge_reference`, then :func:`fake_quant_reference` to ``w.dtype``."""
    return fake_quant_reference(merge_reference(w, a, b, scale), fmt, block_size, w.dtype)


# ----------------------------------------------------------------------------- shared tables


@functools.lru_cache(maxsize=None)
def _q4_table(fmt: str, device: torch.device) -> torch.Tensor:
    """fp32 [31]: the 15 midpoints, then the value of each sorted position (``code[order[pos]]``)."""
    code, bounds, order = quant4._tables(fmt, device)
    return torch.cat([bounds[:15], code[order.long()]]).contiguous()


def _family(fmt: str) -> tuple[int, int]:
    if fmt in quant4.FORMATS_4BIT:
        return 0, 0
    if fmt in quant_int.INT_FORMATS:
        return 1, _INT_KIND[fmt]
    return 2, quant_gguf.KIND[fmt]


# ----------------------------------------------------------------------------- Triton


@jit
def _merged(w_ptr, a_ptr, b_ptr, s, offs, mask, cols, rank, LORA: tl.constexpr, IN_BF16: tl.constexpr):
    """fp32 values of flat elements ``offs`` of W [., cols] (LoRA: + s * sum_k B[i, k] A[k, j])."""
    x = load_f32(w_ptr, offs, mask, IN_BF16)
    if LORA:
        r = offs // cols
        c = offs % cols
        acc = tl.zeros_like(x)
        for k in range(rank):
            bk = tl.load(b_ptr + r * rank + k, mask=mask, other=0.0)
            ak = tl.load(a_ptr + k * cols + c, mask=mask, other=0.0)
            acc = acc + bk * ak
        x = x + s * acc
    return x


@jit
def _fq_q4_kernel(w_ptr, a_ptr, b_ptr, s, table_ptr, out_ptr, n, cols, rank, first_block, n_blocks,
                  BS: tl.constexpr, ROWS: tl.constexpr, PARTIAL: tl.constexpr, IN_BF16: tl.constexpr,
                  TINY: tl.constexpr, LORA: tl.constexpr):
    blk = first_block + tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    blk_ok = blk < n_blocks
    offs = blk.to(tl.int64)[:, None] * BS + tl.arange(0, BS)[None, :]
    mask = (offs < n) & blk_ok[:, None]
    x = _merged(w_ptr, a_ptr, b_ptr, s, offs, mask, cols, rank, LORA, IN_BF16)
    am_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    amc = tl.maximum(am_bits, TINY).to(tl.float32, bitcast=True)
    if PARTIAL:
        am = amc
        sc = tl.math.div_rn(x, amc[:, None])
    else:
        am = am_bits.to(tl.float32, bitcast=True)
        recip = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), amc)
        sc = x * recip[:, None]
    sc = tl.minimum(tl.maximum(sc, -1.0), 1.0)
    pos = tl.zeros((ROWS, BS), dtype=tl.int32)
    for i in tl.static_range(15):
        pos += (sc > tl.load(table_ptr + i)).to(tl.int32)
    v = tl.load(table_ptr + 15 + pos) * am[:, None]
    store_f32(out_ptr, offs, v, mask, IN_BF16)


@jit
def _fq_int_kernel(w_ptr, a_ptr, b_ptr, s, out_ptr, rows, cols, rank, eps,
                   G: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr, IN_BF16: tl.constexpr,
                   LORA: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.program_id(1) * G + tl.arange(0, G)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    offs = r.to(tl.int64)[:, None] * cols + c[None, :]
    x = _merged(w_ptr, a_ptr, b_ptr, s, offs, mask, cols, rank, LORA, IN_BF16)
    am_bits = tl.max(tl.where(mask, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0), axis=1)
    nonfinite = am_bits >= 0x7F800000
    if KIND == 0:
        scale, zero, q = int4_asym_codes(x, mask, eps, ROWS)
        val = (q - zero[:, None]) * scale[:, None]
    else:
        QMAX: tl.constexpr = 7.0 if KIND == 1 else 127.0
        scale = tl.math.div_rn(am_bits.to(tl.float32, bitcast=True), tl.full((ROWS,), QMAX, tl.float32))
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -QMAX - 1.0), QMAX + 1.0)
        q = tl.minimum(tl.maximum(rint(v), -QMAX), QMAX)
        q = tl.where(scale[:, None] > 0, q, 0.0)
        val = q * scale[:, None]
    val = tl.where(nonfinite[:, None], float("nan"), val)
    store_f32(out_ptr, offs, val, mask, IN_BF16)


@jit
def _fq_gguf_kernel(w_ptr, a_ptr, b_ptr, s, thr_ptr, kv_ptr, out_ptr, n, cols, rank, nb,
                    KIND: tl.constexpr, ROWS: tl.constexpr, IN_BF16: tl.constexpr, LORA: tl.constexpr):
    blk = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    bok = blk < nb
    col = tl.arange(0, 32)
    offs = blk.to(tl.int64)[:, None] * 32 + col[None, :]
    mask = (offs < n) & bok[:, None]
    x = _merged(w_ptr, a_ptr, b_ptr, s, offs, mask, cols, rank, LORA, IN_BF16)  # zero padding
    # the codes of quant_gguf's kernels, decoded as its dequantize does (scales rounded to fp16)
    if KIND == 0:
        d, q = q8_0_codes(x, ROWS)
        val = q.to(tl.float32) * d.to(tl.float16).to(tl.float32)[:, None]
    elif KIND == 6:
        e, d, q = mxfp4_codes(x, thr_ptr, kv_ptr, ROWS)
        val = d[:, None] * tl.load(kv_ptr + q)
    elif KIND == 1 or KIND == 3:
        HALF: tl.constexpr = 8.0 if KIND == 1 else 16.0
        d, q = q_0_codes(x, col, HALF, 15 if KIND == 1 else 31, ROWS)
        val = d.to(tl.float16).to(tl.float32)[:, None] * (q.to(tl.float32) - HALF)
    else:
        d, mn, q = q_1_codes(x, 15 if KIND == 2 else 31, ROWS)
        val = d.to(tl.float16).to(tl.float32)[:, None] * q.to(tl.float32) \
            + mn.to(tl.float16).to(tl.float32)[:, None]
    store_f32(out_ptr, offs, val, mask, IN_BF16)


def _fake_quant_triton(w, fmt, bs, lora=None):
    flat = w.contiguous().reshape(-1)
    n = flat.numel()
    cols = w.shape[-1] if w.dim() else 1
    out = torch.empty_like(flat)
    src, dst = kernel_view(flat), kernel_view(out)
    if lora is None:
        a = b = src  # unused pointers
        s, rank = 0.0, 0
    else:
        a, b, s = lora
        rank = a.shape[0]
    common = dict(IN_BF16=flat.dtype == torch.bfloat16, LORA=lora is not None, enable_fp_fusion=False)
    if fmt in quant4.FORMATS_4BIT:
        n_blocks, n_full = triton.cdiv(n, bs), n // bs
        table = _q4_table(fmt, w.device)
        rows = max(1, 4096 // bs)
        if n_full:
            _fq_q4_kernel[(triton.cdiv(n_full, rows),)](src, a, b, s, table, dst, n, cols, rank, 0, n_full,
                                                        BS=bs, ROWS=rows, PARTIAL=False, TINY=quant4.TINY_BITS,
                                                        **common)
        if n_blocks > n_full:
            _fq_q4_kernel[(1,)](src, a, b, s, table, dst, n, cols, rank, n_full, n_blocks,
                                BS=bs, ROWS=1, PARTIAL=True, TINY=quant4.TINY_BITS, **common)
    elif fmt in quant_int.INT_FORMATS:
        rows_total = n // cols
        g = triton.next_power_of_2(cols) if fmt == "int8" else bs
        groups = triton.cdiv(cols, g)
        rpp = max(1, 4096 // g)
        _fq_int_kernel[(triton.cdiv(rows_total, rpp), groups)](src, a, b, s, dst, rows_total, cols, rank,
                                                              quant_int.INT4_EPS, G=g, ROWS=rpp,
                                                              KIND=_INT_KIND[fmt], **common)
    else:
        thr, kv = quant_gguf._tables(w.device)
        nb = quant_gguf.n_blocks(fmt, n)
        _fq_gguf_kernel[(triton.cdiv(nb, 32),)](src, a, b, s, thr, kv, dst, n, cols, rank, nb,
                                                KIND=quant_gguf.KIND[fmt], ROWS=32, **common)
    return out.reshape(w.shape)


# ----------------------------------------------------------------------------- C++


@with_kernel_team(lambda w, *a, **k: w.numel())
def _fake_quant_cpp(w, fmt, bs, lora=None):
    family, kind = _family(fmt)
    cols = w.shape[-1] if w.dim() else 1
    block = cols if fmt == "int8" else bs
    table = _q4_table(fmt, w.device) if family == 0 else torch.empty(0)
    thr = quant_gguf._tables(w.device)[0] if fmt == "mxfp4" else torch.empty(0, dtype=torch.int32)
    ext = load_cpp_ext("fake_quant")
    wc = w.contiguous()
    if lora is None:
        return ext.fake_quant(wc, cols, family, kind, block, table, thr, quant_int.INT4_EPS).reshape(w.shape)
    a, b, s = lora
    return ext.fake_quant_lora(wc, a, b, s, family, kind, block, table, thr, quant_int.INT4_EPS)


# ----------------------------------------------------------------------------- dispatch


def _q4_k_path(x: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    if backend == "torch":
        return fake_quant_reference(x, "q4_k", None, dtype)
    data = quant_gguf.quantize_gguf(x, "q4_k")
    return quant_gguf.dequantize_gguf(data, "q4_k", x.numel(), dtype).reshape(x.shape)


def _run(w, fmt, bs, lora, backend):
    if fmt == "q4_k":
        x = w if lora is None else merge_reference(w, lora[0], lora[1], lora[2])
        return _q4_k_path(x, w.dtype, backend)
    if backend == "triton":
        return _fake_quant_triton(w, fmt, bs, lora)
    if backend == "cpp":
        return _fake_quant_cpp(w, fmt, bs, lora)
    if lora is None:
        return fake_quant_reference(w, fmt, bs)
    return fake_quant_lora_reference(w, lora[0], lora[1], lora[2], fmt, bs)


def fake_quant_values(w: torch.Tensor, fmt: str, block_size: int | None = None, *, lora=None,
                      name: str = "w", check: bool = True) -> torch.Tensor:
    """The single dispatch point (no autograd): ``dequantize(quantize(W))`` in ``w``'s dtype,
    ``W = w`` or, with ``lora=(A, B, s)``, ``W = w + s B A`` formed block by block.

    Backend: ``backend_for(w, cpp="fake_quant")`` (``QRU_BACKEND``). ``check``: raise a
    ValueError naming ``name`` if the input is non-finite or a block's scale overflows (as
    ``qru.quant.quantize`` does); costs one pass (and a device sync on CUDA)."""
    bs = resolve_block_size(fmt, block_size, tuple(w.shape))
    backend = backend_for(w, cpp="fake_quant")
    if lora is not None:
        a, b, s = lora
        lora = (a.detach().float().contiguous(), b.detach().float().contiguous(), float(s))
    out = _run(w.detach(), fmt, bs, lora, backend)
    if check and not _all_finite(out):
        _raise_nonfinite(w.detach() if lora is None else merge_reference(w.detach(), *lora), fmt, name)
    return out


# ----------------------------------------------------------------------------- autograd


class FakeQuantSTE(torch.autograd.Function):
    """``W_q = D(Q(W))`` forward; straight-through backward ``dL/dW = dL/dW_q``.

    Derivation: ``W ↦ D(Q(W))`` is piecewise constant (each element sits on one code until it
    crosses a decision boundary or moves its block's scale), so its true Jacobian is zero almost
    everywhere and undefined on the boundaries: useless for training. The straight-through
    estimator (Bengio et al. 2013) treats the rounding residual ``R(W) = D(Q(W)) - W`` as a
    constant, i.e. ``W_q = W + stopgrad(R(W))``; then ``∂W_q/∂W = I`` and by the chain rule
    ``∂L/∂W = (∂W_q/∂W)ᵀ ∂L/∂W_q = ∂L/∂W_q``, exactly the incoming gradient, in ``W``'s dtype.
    Equivalently, the gradient is that of the unrounded path ``W ↦ L(W + R)`` at ``R = R(W)``.
    """

    @staticmethod
    def forward(ctx, w, fmt, block_size, name):
        return fake_quant_values(w, fmt, block_size, name=name)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class FakeQuantLoRASTE(torch.autograd.Function):
    """``W_q = D(Q(W + s B A))`` forward; straight-through backward to ``W``, ``A`` and ``B``.

    Derivation: with ``W_eff = W + s B A`` and the STE ``W_q = W_eff + stopgrad(R)`` (see
    :class:`FakeQuantSTE`), ``∂L/∂W_eff = G := ∂L/∂W_q``. Elementwise
    ``W_eff[i, j] = W[i, j] + s Σ_k B[i, k] A[k, j]``, so
    ``∂L/∂A[k, j] = Σ_i G[i, j] s B[i, k]``, i.e. ``dA = s Bᵀ G``, and
    ``∂L/∂B[i, k] = Σ_j G[i, j] s A[k, j]``, i.e. ``dB = s G Aᵀ``; ``dW = G``. The products run
    in fp32 and are cast to each factor's dtype. ``s`` gets no gradient.
    """

    @staticmethod
    def forward(ctx, w, a, b, scale, fmt, block_size, name):
        ctx.save_for_backward(a, b)
        ctx.scale = scale
        return fake_quant_values(w, fmt, block_size, lora=(a, b, scale), name=name)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        g = grad.float()
        ga = gb = None
        if ctx.needs_input_grad[1]:
            ga = (ctx.scale * (b.float().t() @ g)).to(a.dtype)
        if ctx.needs_input_grad[2]:
            gb = (ctx.scale * (g @ a.float().t())).to(b.dtype)
        return (grad if ctx.needs_input_grad[0] else None), ga, gb, None, None, None, None


def fake_quant(w: torch.Tensor, fmt: str, block_size: int | None = None, *, name: str = "w") -> torch.Tensor:
    """Differentiable fake quantization (full mode): ``D(Q(w))`` forward, identity (STE) backward.
    ``block_size`` as :func:`qru.quant.quantize` (None: the format's default)."""
    _check_weight(w, name)
    resolve_block_size(fmt, block_size, tuple(w.shape))
    return FakeQuantSTE.apply(w, fmt, block_size, name)


def fake_quant_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, fmt: str,
                    block_size: int | None = None, *, name: str = "w") -> torch.Tensor:
    """Differentiable LoRA-mode fake quantization: ``D(Q(w + s·b·a))`` formed blockwise, in ``w``'s
    dtype; STE gradients ``dA = s·bᵀ·G``, ``dB = s·G·aᵀ`` (and ``G`` to ``w`` if it requires grad).
    ``w`` [out, in], ``a`` [r, in] (peft ``lora_A``), ``b`` [out, r] (``lora_B``)."""
    _check_lora(w, a, b, s, name)
    resolve_block_size(fmt, block_size, tuple(w.shape))
    return FakeQuantLoRASTE.apply(w, a, b, float(s), fmt, block_size, name)


__all__ = ["FAKE_QUANT_FORMATS", "FUSED_FORMATS", "fake_quant", "fake_quant_lora", "fake_quant_values",
           "fake_quant_reference", "fake_quant_lora_reference", "merge_reference", "resolve_block_size",
           "FakeQuantSTE", "FakeQuantLoRASTE"]

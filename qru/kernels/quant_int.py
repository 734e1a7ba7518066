"""Integer weight quantization: ``int4`` (AWQ asymmetric), ``int4_sym`` and ``int8``.

A weight of shape ``(..., in)`` is viewed as ``rows x in`` (rows = product of the
leading dims). Groups are ``group`` consecutive elements along ``in`` within a row;
when ``in % group != 0`` the last group of every row is shorter (handled, not padded).
All arithmetic is fp32 on the upcast input, rounding is half-to-even (``torch.round``).

* ``int4`` (AWQ ``pseudo_quantize_tensor`` convention)::

      scale = max(max - min, 1e-5) / 15
      zero  = clamp(round(-min / scale), 0, 15)
      q     = clamp(round(w / scale) + zero, 0, 15)        w' = (q - zero) * scale

* ``int4_sym``: ``scale = absmax / 7``, ``q = clamp(round(w / scale), -7, 7)`` (0 where
  ``scale == 0``), stored as the nibble ``q + 8``; ``w' = (nibble - 8) * scale``.
* ``int8``: one group per row (per output channel), ``scale = absmax / 127``,
  ``q = clamp(round(w / scale), -127, 127)`` (0 where ``scale == 0``) stored as its
  two's-complement byte; ``w' = q * scale``.

Layout: ``data`` is flat uint8 (int4: ``n // 2`` bytes, element ``2k`` in the high
nibble of byte ``k``, so ``in`` must be even; int8: ``n`` bytes); ``scales`` fp32
``(rows, groups)`` (int8: ``(rows,)``); ``zeros`` uint8 ``(rows, groups)`` (int4 only).
A group containing NaN/Inf, or whose ``max - min`` overflows fp32, gets a NaN/Inf
scale (the caller raises).

Three implementations, equal bit for bit: the torch reference, Triton kernels and
``csrc/quant.cpp``; :func:`quantize_int` / :func:`dequantize_int` dispatch at call time.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels._triton_io import jit, kernel_view, load_f32, store_f32
from qru.kernels.quant4 import BLOCK_SIZES
from qru.kernels.threads import with_kernel_team

INT_FORMATS = ("int4", "int4_sym", "int8")
DEFAULT_GROUP = 128
INT4_EPS = 9.999999747378752e-06  # fp32(1e-5), AWQ's clamp on max - min
_KIND = {"int4": 0, "int4_sym": 1, "int8": 2}
_QMAX = {"int4_sym": 7.0, "int8": 127.0}


def check_int_args(shape: tuple[int, ...], fmt: str, group: int | None) -> int:
    """Validate and return the effective group size (int8: the row length)."""
    if fmt not in INT_FORMATS:
        raise ValueError(f"fmt must be one of {INT_FORMATS}, got {fmt!r}")
    if len(shape) == 0:
        raise ValueError(f"{fmt} needs a tensor with at least one dimension, got a scalar")
    cols = shape[-1]
    if fmt == "int8":
        if group is not None:
            raise ValueError(f"int8 is per output channel; block_size must be None, got {group!r}")
        return max(cols, 1)
    if isinstance(group, bool) or not isinstance(group, int) or group not in BLOCK_SIZES:
        raise ValueError(f"block_size (group) must be a power of two between 32 and 4096, got {group!r}")
    if cols % 2:
        raise ValueError(f"{fmt} packs two values per byte along the last dimension, which must be even; "
                         f"got shape {tuple(shape)}")
    return group


# ----------------------------------------------------------------------------- reference


def quantize_int_reference(x: torch.Tensor, fmt: str, group: int | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pure-torch quantization. Returns ``(data, scales, zeros or None)``."""
    g = check_int_args(tuple(x.shape), fmt, group)
    cols = x.shape[-1]
    rows = x.numel() // max(cols, 1)
    groups = -(-cols // g)
    xf = x.reshape(rows, cols).float()
    xp = torch.nn.functional.pad(xf, (0, groups * g - cols)).view(rows, groups, g)
    valid = (torch.arange(groups * g, device=x.device) < cols).view(groups, g)
    nonfinite = (~torch.isfinite(xp) & valid).any(-1)
    if fmt == "int4":
        mx = torch.where(valid, xp, float("-inf")).amax(-1)
        mn = torch.where(valid, xp, float("inf")).amin(-1)
        scale = torch.clamp(mx - mn, min=INT4_EPS) / 15.0
        zero = torch.clamp(torch.round(-mn / scale), 0, 15)
        q = torch.clamp(torch.round(xp / scale[..., None]) + zero[..., None], 0, 15).to(torch.uint8)
    else:
        qmax = _QMAX[fmt]
        scale = torch.where(valid, xp.abs(), 0.0).amax(-1) / qmax
        q = torch.where(scale[..., None] > 0, torch.clamp(torch.round(xp / scale[..., None]), -qmax, qmax), 0.0)
        q = (q + 8).to(torch.uint8) if fmt == "int4_sym" else q.to(torch.int8).view(torch.uint8)
        zero = None
    scale = torch.where(nonfinite, float("nan"), scale)
    q = q.view(rows, groups * g)[:, :cols].reshape(-1)
    if fmt == "int8":
        return q, scale.view(rows), None
    data = (q[0::2] << 4) | q[1::2]
    return data, scale, (zero.to(torch.uint8) if zero is not None else None)


def dequantize_int_reference(data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: str,
                             shape: tuple[int, ...], group: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Pure-torch dequantization to a ``dtype`` tensor of ``shape``."""
    g = check_int_args(tuple(shape), fmt, group)
    cols = shape[-1]
    n = math.prod(shape)
    rows = n // max(cols, 1)
    groups = -(-cols // g)
    grp = torch.arange(cols, device=data.device) // g
    sc = scales.reshape(rows, groups)[:, grp]
    if fmt == "int8":
        q = data.view(torch.int8).float().view(rows, cols)
    else:
        q = torch.stack([data >> 4, data & 0xF], dim=1).reshape(rows, cols).float()
        q = q - (zeros.reshape(rows, groups)[:, grp].float() if fmt == "int4" else 8.0)
    return (q * sc).to(dtype).reshape(shape)


# ----------------------------------------------------------------------------- Triton


@jit
def rint(v):
    """Round half to even for |v| < 2**22 (fp32 add of 1.5 * 2**23 rounds to an integer)."""
    return (v + 12582912.0) - 12582912.0


@jit
def int4_asym_codes(x, mask, eps, ROWS: tl.constexpr):
    """AWQ-convention asymmetric int4 of each row of ``x`` (one group per row, ``mask`` the valid
    entries): ``(scale, zero, codes)``, the codes 0..15 as fp32. Shared by quantize and fake-quant."""
    mx = tl.max(tl.where(mask, x, float("-inf")), axis=1)
    mn = tl.min(tl.where(mask, x, float("inf")), axis=1)
    scale = tl.math.div_rn(tl.maximum(mx - mn, eps), tl.full((ROWS,), 15.0, tl.float32))
    zv = tl.math.div_rn(-mn, scale)
    zero = tl.minimum(tl.maximum(rint(tl.minimum(tl.maximum(zv, -16.0), 32.0)), 0.0), 15.0)
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -16.0), 16.0)
    q = tl.minimum(tl.maximum(rint(v) + zero[:, None], 0.0), 15.0)
    return scale, zero, q


@jit
def _int4_quant_kernel(x_ptr, data_ptr, scales_ptr, zeros_ptr, rows, cols, n_groups, eps,
                       G: tl.constexpr, ROWS: tl.constexpr, SYM: tl.constexpr, IN_BF16: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    k = tl.program_id(1)
    c = k * G + tl.arange(0, G)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    offs = r.to(tl.int64)[:, None] * cols + c[None, :]
    x = load_f32(x_ptr, offs, mask, IN_BF16)
    am_bits = tl.max(tl.where(mask, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0), axis=1)
    nonfinite = am_bits >= 0x7F800000
    if SYM:
        scale = tl.math.div_rn(am_bits.to(tl.float32, bitcast=True), tl.full((ROWS,), 7.0, tl.float32))
        v = tl.math.div_rn(x, scale[:, None])
        q = tl.minimum(tl.maximum(rint(tl.minimum(tl.maximum(v, -8.0), 8.0)), -7.0), 7.0)
        q = tl.where(scale[:, None] > 0, q, 0.0).to(tl.int32) + 8
    else:
        scale, zero, q = int4_asym_codes(x, mask, eps, ROWS)
        q = q.to(tl.int32)
        tl.store(zeros_ptr + r * n_groups + k, zero.to(tl.uint8), mask=r < rows)
    tl.store(scales_ptr + r * n_groups + k, tl.where(nonfinite, float("nan"), scale), mask=r < rows)
    hi, lo = tl.split(tl.reshape(q, (ROWS, G // 2, 2)))
    boffs = (r.to(tl.int64)[:, None] * cols + k * G) // 2 + tl.arange(0, G // 2)[None, :]
    bmask = (r < rows)[:, None] & ((k * G + 2 * tl.arange(0, G // 2)) < cols)[None, :]
    tl.store(data_ptr + boffs, ((hi << 4) | lo).to(tl.uint8), mask=bmask)


@jit
def _int8_quant_kernel(x_ptr, data_ptr, scales_ptr, rows, cols,
                       ROWS: tl.constexpr, CHUNK: tl.constexpr, IN_BF16: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = r < rows
    base = r.to(tl.int64)[:, None] * cols
    am_bits = tl.zeros((ROWS,), dtype=tl.int32)
    for c0 in range(0, cols, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        mask = rmask[:, None] & (c < cols)[None, :]
        x = load_f32(x_ptr, base + c[None, :], mask, IN_BF16)
        am_bits = tl.maximum(am_bits, tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1))
    scale = tl.math.div_rn(am_bits.to(tl.float32, bitcast=True), tl.full((ROWS,), 127.0, tl.float32))
    tl.store(scales_ptr + r, tl.where(am_bits >= 0x7F800000, float("nan"), scale), mask=rmask)
    for c0 in range(0, cols, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        mask = rmask[:, None] & (c < cols)[None, :]
        x = load_f32(x_ptr, base + c[None, :], mask, IN_BF16)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -128.0), 128.0)
        q = tl.minimum(tl.maximum(rint(v), -127.0), 127.0)
        q = tl.where(scale[:, None] > 0, q, 0.0).to(tl.int32)
        tl.store(data_ptr + base + c[None, :], (q & 0xFF).to(tl.uint8), mask=mask)


@jit
def _int4_dequant_kernel(data_ptr, scales_ptr, zeros_ptr, out_ptr, n_bytes, cols, n_groups,
                         G: tl.constexpr, BLOCK: tl.constexpr, SYM: tl.constexpr, OUT_BF16: tl.constexpr):
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mb = b < n_bytes
    byte = tl.load(data_ptr + b, mask=mb, other=0).to(tl.int32)
    e = 2 * b
    grp = (e // cols) * n_groups + (e % cols) // G
    s = tl.load(scales_ptr + grp, mask=mb, other=0.0)
    if SYM:
        z = 8
    else:
        z = tl.load(zeros_ptr + grp, mask=mb, other=0).to(tl.int32)
    v = tl.interleave(((byte >> 4) - z).to(tl.float32) * s, ((byte & 0xF) - z).to(tl.float32) * s)
    eo = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    store_f32(out_ptr, eo, v, eo < 2 * n_bytes, OUT_BF16)


@jit
def _int8_dequant_kernel(data_ptr, scales_ptr, out_ptr, n, cols, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < n
    q = tl.load(data_ptr + e, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    store_f32(out_ptr, e, q * tl.load(scales_ptr + e // cols, mask=m, other=0.0), m, OUT_BF16)


def _quantize_triton(x, fmt, group):
    g = check_int_args(tuple(x.shape), fmt, group)
    flat = x.contiguous().reshape(-1)
    cols = x.shape[-1]
    rows = flat.numel() // max(cols, 1)
    groups = -(-cols // g)
    dev = x.device
    src = kernel_view(flat)
    bf16 = flat.dtype == torch.bfloat16
    if fmt == "int8":
        data = torch.empty(flat.numel(), dtype=torch.uint8, device=dev)
        scales = torch.empty(rows, dtype=torch.float32, device=dev)
        if rows:
            _int8_quant_kernel[(triton.cdiv(rows, 4),)](src, data, scales, rows, cols,
                                                        ROWS=4, CHUNK=1024, IN_BF16=bf16)
        return data, scales, None
    data = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=dev)
    scales = torch.empty(rows, groups, dtype=torch.float32, device=dev)
    zeros = torch.empty(rows, groups, dtype=torch.uint8, device=dev) if fmt == "int4" else None
    if rows and groups:
        rpp = max(1, 4096 // g)
        _int4_quant_kernel[(triton.cdiv(rows, rpp), groups)](
            src, data, scales, zeros if zeros is not None else scales, rows, cols, groups, INT4_EPS,
            G=g, ROWS=rpp, SYM=fmt == "int4_sym", IN_BF16=bf16)
    return data, scales, zeros


def _dequantize_triton(data, scales, zeros, fmt, shape, group, dtype):
    g = check_int_args(tuple(shape), fmt, group)
    cols = shape[-1]
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=data.device)
    if n == 0:
        return out.reshape(shape)
    dst = kernel_view(out)
    bf16 = dtype == torch.bfloat16
    if fmt == "int8":
        _int8_dequant_kernel[(triton.cdiv(n, 2048),)](data, scales, dst, n, cols, BLOCK=2048, OUT_BF16=bf16)
    else:
        _int4_dequant_kernel[(triton.cdiv(data.numel(), 1024),)](
            data, scales, zeros if zeros is not None else data, dst, data.numel(), cols, -(-cols // g),
            G=g, BLOCK=1024, SYM=fmt == "int4_sym", OUT_BF16=bf16)
    return out.reshape(shape)


# ----------------------------------------------------------------------------- C++


@with_kernel_team(lambda x, *a, **k: x.numel())
def _quantize_cpp(x, fmt, group, scalar: bool = False):
    g = check_int_args(tuple(x.shape), fmt, group)
    cols = x.shape[-1]
    data, scales, zeros = load_cpp_ext("quant").int_quantize(
        x.contiguous().reshape(-1), max(cols, 1), g, _KIND[fmt], INT4_EPS, scalar)
    if fmt == "int8":
        return data, scales.reshape(-1), None
    return data, scales, zeros if fmt == "int4" else None


@with_kernel_team(lambda data, scales, zeros, fmt, shape, *a, **k: math.prod(shape))
def _dequantize_cpp(data, scales, zeros, fmt, shape, group, dtype, scalar: bool = False):
    g = check_int_args(tuple(shape), fmt, group)
    z = zeros.contiguous() if zeros is not None else torch.empty(0, dtype=torch.uint8)
    out = load_cpp_ext("quant").int_dequantize(data.contiguous(), scales.contiguous(), z, max(shape[-1], 1), g,
                                               _KIND[fmt], dtype, scalar)
    return out.reshape(shape)


# ----------------------------------------------------------------------------- dispatch


def quantize_int(x: torch.Tensor, fmt: str, group: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x`` (bf16/fp16/fp32, shape ``(..., in)``) to ``(data, scales, zeros)``.
    ``group`` defaults to 128 for int4/int4_sym and must be None for int8."""
    if group is None and fmt != "int8":
        group = DEFAULT_GROUP
    check_int_args(tuple(x.shape), fmt, group)
    backend = backend_for(x, cpp="quant")
    if backend == "triton":
        return _quantize_triton(x, fmt, group)
    if backend == "cpp":
        return _quantize_cpp(x, fmt, group)
    return quantize_int_reference(x, fmt, group)


def dequantize_int(data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: str,
                   shape: tuple[int, ...], group: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_int`: a ``dtype`` tensor of ``shape``."""
    shape = tuple(shape)
    check_int_args(shape, fmt, group)
    backend = backend_for(data, cpp="quant")
    if backend == "triton":
        return _dequantize_triton(data, scales, zeros, fmt, shape, group, dtype)
    if backend == "cpp":
        return _dequantize_cpp(data, scales, zeros, fmt, shape, group, dtype)
    return dequantize_int_reference(data, scales, zeros, fmt, shape, group, dtype)

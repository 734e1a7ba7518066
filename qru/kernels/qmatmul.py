"""Quantized linear ``y = x Wᵀ + b`` with ``W`` in a qru packed format, dequantized on the fly.

``W`` is ``(out_features, in_features)`` packed as :mod:`qru.kernels.quant4` (nf4 / fp4:
packed codes + fp32 absmax per block of the flattened weight) or :mod:`qru.kernels.quant_int`
(int4 / int4_sym: packed codes + fp32 scales (+ uint8 zeros) per group along ``in``; int8:
bytes + one fp32 scale per row). The compute dtype is ``x.dtype``: weights are dequantized to
it (``code[q] * absmax`` in fp32, rounded once) exactly as ``dequantize(..., x.dtype)`` does.

Implementations:

* torch reference (:func:`quant_linear_reference`): dequantize, then ``F.linear``; the oracle;
* C++ (``csrc/qmatmul.cpp``) for ``rows <= FUSED_MAX_ROWS`` (decode): fused, the weight is
  never materialized (per-block 16-entry tables indexed by the codes, fp32 accumulation);
  more rows: dequantize (C++ kernel) + the dense GEMM of the one linear dispatch
  (:func:`qru.kernels.linear.linear`: oneDNN or BLAS, as calibrated);
* Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``) for ``rows <= TRITON_FUSED_MAX_ROWS``: a
  tiled GEMM that dequantizes each weight tile in registers; bf16/fp16 on CUDA feed the tile to
  tensor-core ``tl.dot`` in that dtype with fp32 accumulation, fp32 (and the interpreter) use
  ``tl.dot`` in fp32, IEEE precision. Tiles autotuned over :data:`QMM_CONFIGS` on CUDA. More
  rows: dequantize (Triton kernel) + ``F.linear`` (cuBLAS). :func:`select_path` is the rule.

Every path uses the same dequantized weight values; results differ from the reference only
by summation order. With autograd on (``x`` or ``bias`` requiring grad) the dequantize +
``F.linear`` path runs, so gradients flow to ``x`` and ``bias``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qru.kernels import quant4, quant_int
from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels._triton_io import jit, kernel_view, load_f32, store_f32
from qru.kernels.linear import linear

FORMATS = ("nf4", "fp4", "int4", "int4_sym", "int8")
FUSED_MAX_ROWS = 8
# Triton (GPU): the fused kernel up to this many rows, above it dequantize once + cuBLAS
# (F.linear). The fused kernel reads the packed weight (a quarter of the bf16 bytes), which
# wins while the GEMM is bound by weight traffic (decode, short prompts); with more rows
# cuBLAS's tensor-core GEMM amortizes one dequantize. A starting value, not yet measured:
# bench/gpu_suite.py times both sides over the rows to tune it.
TRITON_FUSED_MAX_ROWS = 64
_KIND = {"nf4": 0, "fp4": 0, "int4": 1, "int4_sym": 2, "int8": 3}
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _check(x, data, scales, zeros, fmt, block_size, out_features, in_features, bias) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    if data.dtype != torch.uint8:
        raise TypeError(f"packed weight must be uint8, got {data.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales / absmax must be float32, got {scales.dtype}")
    if fmt == "int4" and zeros is None:
        raise ValueError("int4 needs zeros")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")


def dequantize_weight(data, scales, zeros, fmt, block_size, out_features, in_features, dtype,
                      reference: bool = False) -> torch.Tensor:
    """The ``(out, in)`` weight in ``dtype`` (dispatching kernels, or the torch reference)."""
    n = out_features * in_features
    if fmt in quant4.FORMATS_4BIT:
        fn = quant4.dequantize_4bit_reference if reference else quant4.dequantize_4bit
        return fn(data, scales, fmt, block_size, n, dtype).view(out_features, in_features)
    group = None if fmt == "int8" else block_size
    fn = quant_int.dequantize_int_reference if reference else quant_int.dequantize_int
    return fn(data, scales, zeros, fmt, (out_features, in_features), group, dtype)


def quant_linear_reference(x, data, scales, zeros, fmt, block_size, out_features, in_features, bias=None):
    """Oracle: torch-reference dequantize to ``x.dtype``, then ``F.linear``."""
    _check(x, data, scales, zeros, fmt, block_size, out_features, in_features, bias)
    w = dequantize_weight(data, scales, zeros, fmt, block_size, out_features, in_features, x.dtype, reference=True)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------- Triton


@jit
def _round_w(w, WD: tl.constexpr):
    """fp32 -> compute dtype -> fp32, round to nearest even (bf16 by hand: see _triton_io)."""
    if WD == 1:
        u = w.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return r.to(tl.float32, bitcast=True)
    elif WD == 2:
        return w.to(tl.float16).to(tl.float32)
    else:
        return w


# Tile configurations for the tensor-core kernel. Every entry must also run under the
# interpreter (tests/test_gpu_ready.py launches each one explicitly): BM >= 16 for ``tl.dot``.
QMM_CONFIGS = [
    triton.Config({"BM": 16, "BN": 64, "BK": 64}, num_warps=4, num_stages=3),
    triton.Config({"BM": 16, "BN": 128, "BK": 64}, num_warps=4, num_stages=3),
    triton.Config({"BM": 16, "BN": 64, "BK": 128}, num_warps=4, num_stages=4),
    triton.Config({"BM": 32, "BN": 64, "BK": 64}, num_warps=4, num_stages=3),
    triton.Config({"BM": 64, "BN": 64, "BK": 64}, num_warps=4, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 32}, num_warps=8, num_stages=3),
]
# Blocks under the interpreter (CPU): small, so test shapes span several partial tiles.
INTERPRET_BLOCKS = (16, 32, 32)


@jit
def _qmm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, b_ptr, out_ptr, M, N, K, n_groups, M_BUCKET,
                BS: tl.constexpr, KIND: tl.constexpr, WD: tl.constexpr, IN_BF16: tl.constexpr,
                OUT_BF16: tl.constexpr, HAS_BIAS: tl.constexpr, TC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[M, N] = x[M, K] · W[N, K]ᵀ (+ bias), W decoded tile by tile in registers.

    ``WD``: compute dtype (0 fp32, 1 bf16, 2 fp16); each weight is rounded to it once, as
    ``dequantize(..., x.dtype)`` does. ``TC`` (bf16/fp16 on CUDA): x and the decoded tile enter
    ``tl.dot`` in the half type (tensor cores), accumulation in fp32; both operands are exact in
    it, so the products equal the fp32 ones. Otherwise ``tl.dot`` in fp32, IEEE precision.
    ``M_BUCKET`` (power of two >= M) is the autotune key; the kernel does not read it.
    """
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm = rm < M
    nm = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        km = rk < K
        x = load_f32(x_ptr, rm.to(tl.int64)[:, None] * K + rk[None, :], mm[:, None] & km[None, :], IN_BF16)
        wm = nm[:, None] & km[None, :]
        e = rn.to(tl.int64)[:, None] * K + rk[None, :]
        if KIND == 3:  # int8: one scale per row
            q = tl.load(w_ptr + e, mask=wm, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            w = q * tl.load(s_ptr + rn, mask=nm, other=0.0)[:, None]
        else:
            byte = tl.load(w_ptr + e // 2, mask=wm, other=0).to(tl.int32)
            q = tl.where((e % 2) == 0, byte >> 4, byte & 0xF)
            if KIND == 0:  # nf4 / fp4: codebook x absmax of the flat block
                w = tl.load(code_ptr + q) * tl.load(s_ptr + e // BS, mask=wm, other=0.0)
            else:
                gi = rn[:, None] * n_groups + rk[None, :] // BS
                s = tl.load(s_ptr + gi, mask=wm, other=0.0)
                if KIND == 1:
                    z = tl.load(z_ptr + gi, mask=wm, other=0).to(tl.float32)
                else:
                    z = 8.0
                w = (q.to(tl.float32) - z) * s
        w = _round_w(w, WD)
        if TC:
            if WD == 1:
                acc = tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)
            else:
                acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0)[None, :]
    store_f32(out_ptr, rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mm[:, None] & nm[None, :], OUT_BF16)


_qmm_autotuned = triton.autotune(configs=QMM_CONFIGS, key=["M_BUCKET", "N", "K", "KIND", "WD"])(_qmm_kernel)


def _quant_linear_triton(x2, data, scales, zeros, fmt, block_size, n_out, bias, config=None, tc=None):
    """The Triton launch. ``config`` (a :class:`triton.Config`, or a ``(BM, BN, BK)`` tuple) fixes
    the tiles; None: autotuned over :data:`QMM_CONFIGS` on CUDA, :data:`INTERPRET_BLOCKS` on CPU.
    ``tc``: the half-precision ``tl.dot`` (default: bf16/fp16 on CUDA; tests force it under the
    interpreter)."""
    M, K = x2.shape
    out = torch.empty(M, n_out, dtype=x2.dtype, device=x2.device)
    wd = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x2.dtype]
    kind = _KIND[fmt]
    groups = 1 if kind in (0, 3) else -(-K // block_size)
    code = quant4.codebook(fmt, x2.device) if kind == 0 else scales
    b = bias.float().contiguous() if bias is not None else scales
    args = (kernel_view(x2), data, scales, zeros if zeros is not None else data, code, b, kernel_view(out),
            M, n_out, K, groups, min(triton.next_power_of_2(M), 1024))
    meta = dict(BS=block_size if kind != 3 else 1, KIND=kind, WD=wd,
                IN_BF16=x2.dtype == torch.bfloat16, OUT_BF16=out.dtype == torch.bfloat16,
                HAS_BIAS=bias is not None, TC=(x2.is_cuda if tc is None else tc) and wd != 0)
    if config is None and x2.is_cuda:
        grid = lambda cfg: (triton.cdiv(M, cfg["BM"]), triton.cdiv(n_out, cfg["BN"]))  # noqa: E731
        _qmm_autotuned[grid](*args, **meta)
        return out
    if config is None:
        config = INTERPRET_BLOCKS
    if isinstance(config, triton.Config):
        kw = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        kw = dict(zip(("BM", "BN", "BK"), config))
    grid = (triton.cdiv(M, kw["BM"]), triton.cdiv(n_out, kw["BN"]))
    _qmm_kernel[grid](*args, **meta, **kw)
    return out


# ----------------------------------------------------------------------------- C++


def _quant_linear_cpp_fused(x2, data, scales, zeros, fmt, block_size, n_out, bias, scalar: bool = False):
    ext = load_cpp_ext("qmatmul")
    kind = _KIND[fmt]
    empty_u8 = torch.empty(0, dtype=torch.uint8)
    empty_f = torch.empty(0, dtype=torch.float32)
    code = quant4.codebook(fmt) if kind == 0 else empty_f
    bs = block_size if kind != 3 else x2.shape[1]
    return ext.quant_linear_small(x2.contiguous(), data.contiguous(), scales.contiguous(),
                                  zeros.contiguous() if zeros is not None else empty_u8, code,
                                  bias.contiguous() if bias is not None else empty_f, kind, n_out, bs, scalar)


# ----------------------------------------------------------------------------- dispatch


def select_path(backend: str, rows: int, grad: bool) -> str:
    """Which implementation :func:`quant_linear` runs: ``"reference"`` (torch dequantize +
    ``F.linear``), ``"dequant_linear"`` (kernel dequantize + ``F.linear``: BLAS / cuBLAS),
    ``"cpp_fused"`` or ``"triton_fused"``. Autograd always takes a dequantize path; the fused
    kernels take ``rows <= FUSED_MAX_ROWS`` (C++) or ``<= TRITON_FUSED_MAX_ROWS`` (Triton)."""
    if backend == "torch":
        return "reference"
    if grad:
        return "dequant_linear"
    if backend == "triton":
        return "triton_fused" if rows <= TRITON_FUSED_MAX_ROWS else "dequant_linear"
    if backend == "cpp":
        return "cpp_fused" if rows <= FUSED_MAX_ROWS else "dequant_linear"
    raise ValueError(f"unknown backend {backend!r}")


def quant_linear(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: str,
                 block_size: int | None, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` in ``x.dtype``.

    ``data``/``scales``/``zeros``: the packed weight as :class:`qru.quant.QTensor` holds it,
    with ``scales`` the fp32 absmax for nf4/fp4 (nested state already undone).
    ``block_size``: the 4-bit block or int4 group (ignored for int8). Backend:
    ``backend_for(x, cpp="qmatmul")``.
    """
    _check(x, data, scales, zeros, fmt, block_size, out_features, in_features, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, out_features)
    grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    backend = backend_for(x, cpp="qmatmul")
    b = None if bias is None else bias.to(x.dtype)
    path = select_path(backend, M, grad)
    if path in ("reference", "dequant_linear"):
        w = dequantize_weight(data, scales, zeros, fmt, block_size, out_features, in_features, x.dtype,
                              reference=path == "reference")
        y = F.linear(x2, w, b) if path == "reference" else linear(x2, w, b)
    elif path == "triton_fused":
        y = _quant_linear_triton(x2.contiguous(), data, scales, zeros, fmt, block_size, out_features, b)
    else:
        y = _quant_linear_cpp_fused(x2, data, scales, zeros, fmt, block_size, out_features, b)
    return y.reshape(*lead, out_features)

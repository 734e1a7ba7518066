"""Blockwise 4-bit NF4 / FP4 quantize and dequantize (bitsandbytes-compatible).

Layout (bit-identical to ``bitsandbytes.functional.quantize_4bit`` 0.50.2 on CPU):

* the input is flattened (row-major); blocks are ``block_size`` consecutive elements;
* ``absmax``: one fp32 per block, ``max(|x|)`` over the block;
* each element is normalized in fp32 and mapped to the nearest code by midpoint
  comparison (``torch.bucketize`` semantics: a value exactly on a midpoint takes
  the lower code). Full blocks use ``x * (1 / max(absmax, 1e-38))``; the partial
  last block uses ``x / max(absmax, 1e-38)`` and stores the clamped absmax. Both
  quirks are bitsandbytes' and are reproduced on purpose;
* packed: ``(n + 1) // 2`` uint8, element ``2k`` in the high nibble of byte ``k``;
  an odd count pads the last low nibble with the code of 0.0;
* dequantize: ``code[q] * absmax[block]`` in fp32, rounded once to the output dtype.

Three implementations, equal bit for bit: the torch reference
(:func:`quantize_4bit_reference`), Triton kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``) and the C++ kernels in ``csrc/quant.cpp``.
:func:`quantize_4bit` / :func:`dequantize_4bit` dispatch at call time.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels._triton_io import jit, kernel_view, load_f32, store_f32
from qru.kernels.threads import with_kernel_team

FORMATS_4BIT = ("nf4", "fp4")
BLOCK_SIZES = tuple(1 << k for k in range(5, 13))  # 32 .. 4096
DEFAULT_BLOCK_SIZE = 64

# The 16 NF4 values (exact fp32), ascending; index = 4-bit code.
NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# The 16 FP4 (e2m1, bitsandbytes bias) values divided by 12 in fp32, index = 4-bit code.
FP4_CODE = [
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
]
# Midpoints between consecutive sorted codes, fp32 ``(a + b) / 2``.
NF4_BOUNDS = [
    -0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
    -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
    0.120255246758461, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683,
    0.5016634464263916, 0.6427869200706482, 0.8614784479141235,
]
FP4_BOUNDS = [
    -0.8333333730697632, -0.5833333730697632, -0.4166666865348816, -0.2916666865348816,
    -0.2083333432674408, -0.0859375, -0.0026041667442768812, 0.0,
    0.0026041667442768812, 0.0859375, 0.2083333432674408, 0.2916666865348816,
    0.4166666865348816, 0.5833333730697632, 0.8333333730697632,
]
# sorted position -> code (identity for NF4; bitsandbytes' argsort order for FP4,
# which sends [-0.0026, 0] to code 0 and (0, 0.0026] to code 8).
NF4_ORDER = list(range(16))
FP4_ORDER = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]

# bitsandbytes clamps the divisor with ``clamp(min=1e-38)``; this is fp32(1e-38).
TINY_BITS = 0x006CE3EE
_TABLES = {"nf4": (NF4_CODE, NF4_BOUNDS, NF4_ORDER), "fp4": (FP4_CODE, FP4_BOUNDS, FP4_ORDER)}


def check_format(fmt: str) -> None:
    if fmt not in FORMATS_4BIT:
        raise ValueError(f"fmt must be one of {FORMATS_4BIT}, got {fmt!r}")


def check_block_size(block_size: int, name: str = "block_size") -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"{name} must be a power of two between 32 and 4096, got {block_size!r}")


@functools.lru_cache(maxsize=None)
def _tables(fmt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code fp32[16], bounds fp32[16] (last entry +inf, unused), order int32[16]) on ``device``."""
    check_format(fmt)
    code, bounds, order = _TABLES[fmt]
    return (torch.tensor(code, dtype=torch.float32, device=device),
            torch.tensor(bounds + [float("inf")], dtype=torch.float32, device=device),
            torch.tensor(order, dtype=torch.int32, device=device))


def codebook(fmt: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 codebook of ``fmt`` (index = 4-bit code)."""
    return _tables(fmt, torch.device(device))[0]


# ----------------------------------------------------------------------------- reference


def quantize_4bit_reference(x: torch.Tensor, fmt: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch quantization of ``x`` (any shape, flattened). Returns
    ``(packed uint8[(n + 1) // 2], absmax fp32[ceil(n / block_size)])``."""
    check_format(fmt)
    check_block_size(block_size)
    code, bounds, order = _tables(fmt, x.device)
    flat = x.reshape(-1).float()
    n = flat.numel()
    rem = n % block_size
    full = n - rem
    tiny = torch.tensor(TINY_BITS, dtype=torch.int32, device=x.device).view(torch.float32)
    blocks = flat[:full].view(-1, block_size)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = torch.clamp(blocks * (1.0 / torch.maximum(absmax, tiny)).view(-1, 1), -1, 1).reshape(-1)
    if rem:
        am = torch.maximum(flat[full:].abs().amax(), tiny)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = order[torch.bucketize(scaled, bounds[:15])].to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def dequantize_4bit_reference(packed: torch.Tensor, absmax: torch.Tensor, fmt: str, block_size: int,
                              n: int, dtype: torch.dtype) -> torch.Tensor:
    """Pure-torch dequantization to a flat ``dtype`` tensor of ``n`` elements."""
    code = codebook(fmt, packed.device)
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    block = torch.arange(n, device=packed.device) // block_size
    return (code[q] * absmax[block]).to(dtype)


# ----------------------------------------------------------------------------- Triton


@jit
def _q4_quant_kernel(x_ptr, packed_ptr, absmax_ptr, bounds_ptr, order_ptr,
                     n, n_bytes, first_block, n_blocks,
                     BS: tl.constexpr, ROWS: tl.constexpr, PARTIAL: tl.constexpr,
                     IS_FP4: tl.constexpr, IN_BF16: tl.constexpr, TINY: tl.constexpr):
    pid = tl.program_id(0)
    blk = first_block + pid * ROWS + tl.arange(0, ROWS)
    blk_ok = blk < n_blocks
    start = blk.to(tl.int64) * BS
    offs = start[:, None] + tl.arange(0, BS)[None, :]
    mask = (offs < n) & blk_ok[:, None]
    x = load_f32(x_ptr, offs, mask, IN_BF16)
    # absmax on the bit pattern: exact, and NaN/Inf surface as a non-finite absmax
    am_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    amc = tl.maximum(am_bits, TINY).to(tl.float32, bitcast=True)
    if PARTIAL:
        tl.store(absmax_ptr + blk, amc, mask=blk_ok)
        s = tl.math.div_rn(x, amc[:, None])
    else:
        tl.store(absmax_ptr + blk, am_bits.to(tl.float32, bitcast=True), mask=blk_ok)
        recip = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), amc)
        s = x * recip[:, None]
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    q = tl.zeros((ROWS, BS), dtype=tl.int32)
    for i in tl.static_range(15):
        q += (s > tl.load(bounds_ptr + i)).to(tl.int32)
    if IS_FP4:
        q = tl.load(order_ptr + q)
    hi, lo = tl.split(tl.reshape(q, (ROWS, BS // 2, 2)))
    byte = ((hi << 4) | lo).to(tl.uint8)
    boffs = (start // 2)[:, None] + tl.arange(0, BS // 2)[None, :]
    tl.store(packed_ptr + boffs, byte, mask=(boffs < n_bytes) & blk_ok[:, None])


@jit
def _q4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, n_bytes,
                       BS: tl.constexpr, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
    pid = tl.program_id(0)
    boffs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mb = boffs < n_bytes
    byte = tl.load(packed_ptr + boffs, mask=mb, other=0).to(tl.int32)
    a = tl.load(absmax_ptr + (boffs * 2) // BS, mask=mb, other=0.0)
    v = tl.interleave(tl.load(code_ptr + (byte >> 4)) * a, tl.load(code_ptr + (byte & 0xF)) * a)
    eoffs = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    store_f32(out_ptr, eoffs, v, eoffs < n, OUT_BF16)


def _quantize_triton(x: torch.Tensor, fmt: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    n_blocks, n_full = triton.cdiv(n, block_size), n // block_size
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    _, bounds, order = _tables(fmt, x.device)
    src = kernel_view(flat)
    common = dict(BS=block_size, IS_FP4=fmt == "fp4", IN_BF16=flat.dtype == torch.bfloat16, TINY=TINY_BITS)
    rows = max(1, 4096 // block_size)
    if n_full:
        _q4_quant_kernel[(triton.cdiv(n_full, rows),)](
            src, packed, absmax, bounds, order, n, packed.numel(), 0, n_full,
            ROWS=rows, PARTIAL=False, **common)
    if n_blocks > n_full:
        _q4_quant_kernel[(1,)](
            src, packed, absmax, bounds, order, n, packed.numel(), n_full, n_blocks,
            ROWS=1, PARTIAL=True, **common)
    return packed, absmax


def _dequantize_triton(packed, absmax, fmt, block_size, n, dtype):
    out = torch.empty(n, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    block = 1024
    _q4_dequant_kernel[(triton.cdiv(packed.numel(), block),)](
        packed, absmax, codebook(fmt, packed.device), kernel_view(out), n, packed.numel(),
        BS=block_size, BLOCK=block, OUT_BF16=dtype == torch.bfloat16)
    return out


# ----------------------------------------------------------------------------- C++


# instruction-set paths of the C++ kernels (the most capable first); one not compiled on this CPU
# falls back to the next
CPP_PATHS = {"avx512": 2, "avx2": 1, "scalar": 0}


@with_kernel_team(lambda x, *a, **k: x.numel())
def _quantize_cpp(x: torch.Tensor, fmt: str, block_size: int, scalar: bool = False, path: str = "avx512"):
    """``path`` caps the instruction set (tests force each one); ``scalar=True`` means ``path="scalar"``."""
    _, bounds, order = _tables(fmt, x.device)
    return load_cpp_ext("quant").q4_quantize(x.reshape(-1).contiguous(), bounds, order, block_size, scalar,
                                             CPP_PATHS[path])


@with_kernel_team(lambda packed, absmax, fmt, block_size, n, *a, **k: n)
def _dequantize_cpp(packed, absmax, fmt, block_size, n, dtype, scalar: bool = False, path: str = "avx512"):
    """``path`` caps the instruction set (tests force each one); ``scalar=True`` means ``path="scalar"``."""
    return load_cpp_ext("quant").q4_dequantize(
        packed.contiguous(), absmax.contiguous(), codebook(fmt, packed.device), block_size, n, dtype, scalar,
        CPP_PATHS[path])


# ----------------------------------------------------------------------------- dispatch


def quantize_4bit(x: torch.Tensor, fmt: str, block_size: int = DEFAULT_BLOCK_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (bf16/fp16/fp32, any shape) to ``(packed uint8[(n+1)//2], absmax fp32[blocks])``.

    Non-finite input is not rejected here; it shows up as a non-finite absmax
    (the caller raises). Backend: ``backend_for(x, cpp="quant")``.
    """
    check_format(fmt)
    check_block_size(block_size)
    backend = backend_for(x, cpp="quant")
    if backend == "triton":
        return _quantize_triton(x, fmt, block_size)
    if backend == "cpp":
        return _quantize_cpp(x, fmt, block_size)
    return quantize_4bit_reference(x, fmt, block_size)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, fmt: str, block_size: int, n: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: a flat ``dtype`` tensor of ``n`` elements."""
    check_format(fmt)
    check_block_size(block_size)
    backend = backend_for(packed, cpp="quant")
    if backend == "triton":
        return _dequantize_triton(packed, absmax, fmt, block_size, n, dtype)
    if backend == "cpp":
        return _dequantize_cpp(packed, absmax, fmt, block_size, n, dtype)
    return dequantize_4bit_reference(packed, absmax, fmt, block_size, n, dtype)

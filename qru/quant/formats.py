"""Public weight-quantization API: :class:`QTensor`, :func:`quantize`, :func:`dequantize` (the type and
its decoding live in :mod:`qru.kernels.qtensor`, the one packed-weight type every layer shares).

Formats (layouts in docs/formats.md):

* ``nf4`` / ``fp4``: bitsandbytes-compatible blockwise 4-bit (default block 64), optional
  nested (double) quantization of the absmax as bitsandbytes does it;
* ``int4``: AWQ-style asymmetric groupwise (default group 128), with integer zero points;
* ``int4_sym``: symmetric groupwise, ``absmax / 7`` (default group 128);
* ``int8``: per output channel (row), ``absmax / 127``;
* llama.cpp's GGUF block formats ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` (32-element
  blocks, fp16 scale, and min for ``_1``), ``q4_k`` (256-element super-blocks, 6-bit sub-block
  scales and mins) and ``mxfp4`` (OCP MX: E8M0 scale per 32, E2M1 elements). ``data`` holds
  the llama.cpp block structs of the flattened tensor, byte for byte (``scales`` is empty).

:data:`FORMATS` are the formats with a safetensors checkpoint layout (``qru quantize``),
:data:`GGUF_FORMATS` the llama.cpp ones, :data:`ALL_FORMATS` everything :func:`quantize` takes.
The kernels live in :mod:`qru.kernels.quant4`, :mod:`qru.kernels.quant_int` and
:mod:`qru.kernels.quant_gguf` (torch reference, Triton, C++; chosen at call time).
"""
from __future__ import annotations

import functools

import torch

from qru.kernels import quant4, quant_gguf, quant_int
from qru.kernels.qtensor import _FLOAT_DTYPES, DOUBLE_QUANT_BLOCK, DoubleQuant, QTensor, dequantize

__all__ = ["ALL_FORMATS", "DEFAULT_BLOCK_SIZE", "DOUBLE_QUANT_BLOCK", "FORMATS", "GGUF_FORMATS", "DoubleQuant", "QTensor",
           "create_dynamic_map", "dequantize", "quantize"]

FORMATS = ("nf4", "fp4", "int4", "int4_sym", "int8")
GGUF_FORMATS = quant_gguf.GGUF_FORMATS
ALL_FORMATS = FORMATS + GGUF_FORMATS
DEFAULT_BLOCK_SIZE = {"nf4": 64, "fp4": 64, "int4": 128, "int4_sym": 128, "int8": None, **quant_gguf.BLOCK}


# ----------------------------------------------------------------------------- nested absmax


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map (``bitsandbytes.functional.create_dynamic_map``), fp32 [256]."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                    else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dynamic map fp32[256], 65536-entry uint8 LUT) on ``device``.

    The LUT is bitsandbytes 0.50.2's CPU ``quantize_blockwise`` table: grid point ``k``
    is ``2k / 65535 - 1`` in fp32, mapped to the number of code midpoints below it.
    """
    code = create_dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    k = torch.arange(65536, dtype=torch.float32)
    lut = torch.bucketize((k + k) / 65535.0 - 1.0, mids).to(torch.uint8)
    return code.to(device), lut.to(device)


def _nested_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, DoubleQuant]:
    """bitsandbytes' nested quantization: ``offset = mean(absmax)``, then 8-bit blockwise
    (256) quantization of ``absmax - offset`` over the dynamic map, reproducing the CPU
    kernel of bitsandbytes 0.50.2 bit for bit: ``s = clamp(x * (1 / amax), -1, 1)``,
    ``code = LUT[trunc(fma((s + 1) * 0.5, 65535, 0.5))]`` (all-zero blocks: code 0)."""
    code, lut = _dynamic_tables(absmax.device)
    offset = absmax.mean()
    x = absmax - offset
    n = x.numel()
    nb = -(-n // DOUBLE_QUANT_BLOCK)
    xp = torch.nn.functional.pad(x, (0, nb * DOUBLE_QUANT_BLOCK - n)).view(nb, DOUBLE_QUANT_BLOCK)
    am = xp.abs().amax(dim=1)
    safe = torch.where(am == 0, torch.ones_like(am), am)
    s = torch.clamp(xp * (1.0 / safe).view(-1, 1), -1, 1)
    # fp32 fma((s + 1) * 0.5, 65535, 0.5): both double steps are exact here, so the
    # final rounding to fp32 is the fma's single rounding.
    t = (((s + 1.0) * 0.5).double() * 65535.0 + 0.5).float()
    q = torch.where((am == 0).view(-1, 1), 0, lut[t.long()].int()).to(torch.uint8)
    return q.reshape(-1)[:n], DoubleQuant(absmax2=am, offset=offset, code=code)


# ----------------------------------------------------------------------------- public API


def _check_input(w, fmt: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if fmt not in ALL_FORMATS:
        raise ValueError(f"fmt must be one of {ALL_FORMATS}, got {fmt!r}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"w must be bfloat16, float16 or float32, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"w has no elements (shape {tuple(w.shape)}); nothing to quantize")


def _raise_nonfinite(w: torch.Tensor, fmt: str) -> None:
    bad = ~torch.isfinite(w)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"w contains NaN or Inf (first at index {idx}, value {w[idx].item()}); "
                         f"cannot quantize to {fmt}")
    raise ValueError(f"w: a group's max - min overflows float32 (|w| up to {w.abs().max().item():.3g}); "
                     f"cannot quantize to {fmt}")


def quantize(w: torch.Tensor, fmt: str, block_size: int | None = None, *,
             double_quant: bool = False) -> QTensor:
    """Quantize ``w`` (bf16/fp16/fp32) to ``fmt``.

    ``block_size``: the 4-bit block (default 64) or the int4 group (default 128), a
    power of two in [32, 4096]; must be None for ``int8``; GGUF formats have a fixed block
    (None or that value). ``double_quant`` (nf4/fp4 only) nests the absmax as bitsandbytes'
    ``compress_statistics=True``. nf4/fp4 and GGUF formats accept any shape (flattened, the
    last block zero-padded); integer formats group along the last dimension (int4 formats
    need it even). NaN/Inf raise ValueError, as does a GGUF fp16 scale that overflows.
    """
    _check_input(w, fmt)
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE[fmt]
    if double_quant and fmt not in quant4.FORMATS_4BIT:
        raise ValueError(f"double_quant applies to nf4/fp4 only, not {fmt!r}")
    w = w.contiguous()
    if fmt in GGUF_FORMATS:
        return _quantize_gguf(w, fmt, block_size)
    if fmt in quant4.FORMATS_4BIT:
        quant4.check_block_size(block_size)
        data, scales = quant4.quantize_4bit(w, fmt, block_size)
        zeros = None
    else:
        data, scales, zeros = quant_int.quantize_int(w, fmt, block_size)
        block_size = block_size if fmt != "int8" else w.shape[-1]
    if not bool(torch.isfinite(scales).all()):
        _raise_nonfinite(w, fmt)
    dq = None
    if double_quant:
        scales, dq = _nested_quantize(scales)
    return QTensor(data=data, scales=scales, zeros=zeros, shape=w.shape, dtype=w.dtype, fmt=fmt,
                   block_size=block_size, double_quant=dq)


def _quantize_gguf(w: torch.Tensor, fmt: str, block_size: int) -> QTensor:
    if block_size != quant_gguf.BLOCK[fmt]:
        raise ValueError(f"{fmt} has a fixed block of {quant_gguf.BLOCK[fmt]} elements; block_size must be "
                         f"None or {quant_gguf.BLOCK[fmt]}, got {block_size!r}")
    if not bool(torch.isfinite(w).all()):
        _raise_nonfinite(w, fmt)
    data = quant_gguf.quantize_gguf(w, fmt)
    if quant_gguf.fp16_scale_overflow(data, fmt):
        raise ValueError(f"w: |w| up to {w.abs().max().item():.3g} overflows {fmt}'s fp16 block scale; "
                         f"cannot quantize to {fmt}")
    return QTensor(data=data, scales=torch.empty(0, dtype=torch.float32, device=w.device), zeros=None,
                   shape=w.shape, dtype=w.dtype, fmt=fmt, block_size=block_size)

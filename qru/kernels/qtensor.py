"""The one packed-weight type: :class:`QTensor` (and its nested absmax state :class:`DoubleQuant`), with
:func:`dequantize`. It sits in the kernel layer so that every layer above (the LoRA kernels, quantized
linears, checkpoint layouts, survival) passes the same object; :func:`qru.quant.formats.quantize` makes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from qru.kernels import quant4, quant_gguf, quant_int

DOUBLE_QUANT_BLOCK = 256
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GGUF_FORMATS = quant_gguf.GGUF_FORMATS


@dataclass
class DoubleQuant:
    """Nested quantization state of the absmax (bitsandbytes ``compress_statistics``).

    The owning :class:`QTensor`'s ``scales`` then holds one uint8 code per 4-bit block:
    ``absmax[i] = code[scales[i]] * absmax2[i // 256] + offset`` (fp32, in that order).
    """
    absmax2: torch.Tensor  # fp32 [ceil(blocks / 256)], absmax of (absmax - offset) per 256 codes
    offset: torch.Tensor   # fp32 0-dim, mean of the 4-bit absmax
    code: torch.Tensor     # fp32 [256], bitsandbytes' signed dynamic 8-bit map
    block_size: int = DOUBLE_QUANT_BLOCK


@dataclass
class QTensor:
    """A quantized tensor.

    ``data``: packed uint8 (flat; GGUF formats: llama.cpp's block structs); ``scales``: fp32 per
    block / group / row (uint8 codes when ``double_quant`` is set; empty for GGUF formats, whose
    scales live in ``data``); ``zeros``: uint8 zero points (``int4`` only, else None);
    ``shape`` / ``dtype``: the original tensor's; ``block_size``: the block or group size
    (``int8``: the row length).
    """
    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    fmt: str
    block_size: int
    double_quant: DoubleQuant | None = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized tensor (``dtype`` defaults to the original dtype)."""
        return dequantize(self, dtype)

    def absmax(self) -> torch.Tensor:
        """fp32 per-block scales, undoing the nested quantization if any (4-bit formats:
        the absmax per block; integer formats: ``scales``)."""
        if self.double_quant is None:
            return self.scales
        return _nested_dequantize(self.scales, self.double_quant)

    def codebook(self) -> torch.Tensor:
        """nf4 / fp4: the 16-entry fp32 codebook (index = 4-bit code) on this tensor's device."""
        if self.fmt not in quant4.FORMATS_4BIT:
            raise ValueError(f"{self.fmt} has no 4-bit codebook")
        return quant4.codebook(self.fmt, self.device)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized representation."""
        parts = [self.data, self.scales, self.zeros]
        if self.double_quant is not None:
            parts += [self.double_quant.absmax2, self.double_quant.offset, self.double_quant.code]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str) -> "QTensor":
        """A copy on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        dq = self.double_quant
        if dq is not None:
            dq = replace(dq, absmax2=mv(dq.absmax2), offset=mv(dq.offset), code=mv(dq.code))
        return replace(self, data=mv(self.data), scales=mv(self.scales), zeros=mv(self.zeros), double_quant=dq)


def _nested_dequantize(codes: torch.Tensor, dq: DoubleQuant) -> torch.Tensor:
    """fp32 absmax from nested codes: ``code[q] * absmax2[i // 256] + offset``."""
    block = torch.arange(codes.numel(), device=codes.device) // dq.block_size
    return dq.code[codes.long()] * dq.absmax2[block] + dq.offset


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize ``q`` to a tensor of its original shape (``dtype`` defaults to ``q.dtype``)."""
    if not isinstance(q, QTensor):
        raise TypeError(f"q must be a QTensor, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    n = math.prod(q.shape)
    if q.fmt in GGUF_FORMATS:
        return quant_gguf.dequantize_gguf(q.data, q.fmt, n, dtype).reshape(q.shape)
    if q.fmt in quant4.FORMATS_4BIT:
        out = quant4.dequantize_4bit(q.data, q.absmax(), q.fmt, q.block_size, n, dtype)
        return out.reshape(q.shape)
    group = None if q.fmt == "int8" else q.block_size
    return quant_int.dequantize_int(q.data, q.scales, q.zeros, q.fmt, tuple(q.shape), group, dtype)

"""Per-element codes and local quantization steps of a :class:`QTensor`: how many stored codes an
update flips (:func:`code_flips`) and how far a weight may move before it can flip (:func:`local_step`,
:func:`below_half_step`). Used by the survival analysis and quantization-aware training.

Codes are the 4-bit nibble (nf4, fp4, int4, int4_sym, q4_0, q4_1, q4_k, mxfp4), the 5-bit code
(q5_0, q5_1) or the 8-bit code (int8, q8_0); fp4's and mxfp4's two codes of zero count as one. The
local step: int4 / int4_sym: the group scale; int8: the row scale; q8_0, q4_0, q4_1, q5_0, q5_1:
``|d|`` of the block; q4_k: ``d · sc`` of the 32-element sub-block; nf4 / fp4 / mxfp4: the block
scale times the gap from the level the weight is coded to, to the next codebook level in the
direction of the update (the only neighbour at the ends of the codebook; ±0 codes are one level).
"""
from __future__ import annotations

import math

import torch

from qru.kernels import quant4, quant_gguf
from qru.quant.formats import GGUF_FORMATS, QTensor


def _nibbles(data: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack((data >> 4, data & 15), dim=1).reshape(-1)[:n]


@torch.no_grad()
def _tables(fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit formats: (code → level index, level → gap up, level → gap down), levels being the
    distinct codebook values ascending; at the ends the one existing gap is used both ways."""
    code = torch.tensor(quant4.NF4_CODE if fmt == "nf4" else quant4.FP4_CODE, dtype=torch.float32)
    levels = torch.unique(code)  # sorted; fp4's two zeros merge
    level_of = torch.searchsorted(levels, code)
    gaps = levels[1:] - levels[:-1]
    up = torch.cat((gaps, gaps[-1:]))
    down = torch.cat((gaps[:1], gaps))
    return level_of, up, down


@torch.no_grad()
def _mxfp4_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mxfp4 as :func:`_tables` does nf4 / fp4 (levels in units of the E8M0 half-scale)."""
    code = torch.tensor(quant_gguf.MXFP4_VALUES, dtype=torch.float32)
    levels = torch.unique(code)
    level_of = torch.searchsorted(levels, code)
    gaps = levels[1:] - levels[:-1]
    return level_of, torch.cat((gaps, gaps[-1:])), torch.cat((gaps[:1], gaps))


_TABLES = {**{f: _tables(f) for f in quant4.FORMATS_4BIT}, "mxfp4": _mxfp4_tables()}
# (code * 2 + [delta > 0]) -> the codebook gap in that direction (normalized units)
_GAP = {f: torch.stack((t[2][t[0]], t[1][t[0]]), dim=1).reshape(-1) for f, t in _TABLES.items()}
_HALF_GAP = {f: 0.5 * g for f, g in _GAP.items()}
# fp4 bytes with both nibbles made canonical (code 8, +0.0, -> code 0, also +0.0)
_FP4_CANON = torch.tensor([((b >> 4) & 7 if (b >> 4) == 8 else b >> 4) << 4 | ((b & 15) & 7 if (b & 15) == 8 else b & 15)
                           for b in range(256)], dtype=torch.uint8)


def _gguf_codes(q: QTensor) -> torch.Tensor:
    c = quant_gguf.block_codes(q.data, q.fmt).reshape(-1)[:math.prod(q.shape)]
    return _TABLES["mxfp4"][0][c] if q.fmt == "mxfp4" else c


def codes(q: QTensor) -> torch.Tensor:
    """Flat per-element code of ``q`` as compared by ``code_flip_frac`` (fp4, mxfp4: ±0 merged;
    mxfp4 codes are then level indices)."""
    n = math.prod(q.shape)
    if q.fmt in GGUF_FORMATS:
        return _gguf_codes(q)
    if q.fmt == "int8":
        return q.data.view(torch.int8).reshape(-1)
    c = _nibbles(q.data, n)
    if q.fmt == "fp4":
        return _TABLES["fp4"][0][c.long()]
    return c


def code_flips(qa: QTensor, qb: QTensor) -> int:
    """How many elements' codes differ between ``qa`` and ``qb`` (same shape and format)."""
    a, b = qa.data, qb.data
    if qa.fmt in GGUF_FORMATS:  # per element: a padded tail's codes may differ and do not count
        return int((_gguf_codes(qa) != _gguf_codes(qb)).sum())
    if qa.fmt == "int8":
        return int((a != b).sum())
    if qa.fmt == "fp4":
        a, b = _FP4_CANON[a.long()], _FP4_CANON[b.long()]
    x = a ^ b  # an odd count's pad nibble is the same in both
    return int(((x >> 4) != 0).sum()) + int(((x & 15) != 0).sum())


def _gap_key(q: QTensor, delta: torch.Tensor) -> torch.Tensor:
    """int64 ``code * 2 + [delta > 0]`` per element (4-bit formats), built in uint8."""
    c = _nibbles(q.data, delta.numel())
    return ((c << 1) | (delta.reshape(-1) > 0).view(torch.uint8)).long()


def local_step(q: QTensor, delta: torch.Tensor) -> torch.Tensor:
    """Flat per-element local quantization step of ``q`` (see module docstring); ``delta``
    (the update, same numel) picks the direction for nf4 / fp4."""
    n = math.prod(q.shape)
    if q.fmt in GGUF_FORMATS:
        return _gguf_step(q, delta)
    if q.fmt in quant4.FORMATS_4BIT:
        return torch.take(_GAP[q.fmt], _gap_key(q, delta)) * q.absmax().repeat_interleave(q.block_size)[:n]
    inner = q.shape[-1]
    scales = q.scales.reshape(-1, 1) if q.fmt == "int8" else q.scales
    return scales.repeat_interleave(q.block_size if q.fmt != "int8" else inner, dim=1)[:, :inner].reshape(-1)


def _gguf_step(q: QTensor, delta: torch.Tensor) -> torch.Tensor:
    """GGUF formats: the uniform step ``|d|`` (q4_k: ``d · sc`` per sub-block), or for mxfp4 the
    E8M0 half-scale times the codebook gap in the direction of ``delta``."""
    n = delta.numel()
    scale, _ = quant_gguf.block_affine(q.data, q.fmt)
    per = quant_gguf.BLOCK[q.fmt] // scale.shape[1]
    step = scale.abs().repeat_interleave(per, dim=1).reshape(-1)[:n]
    if q.fmt != "mxfp4":
        return step
    c = quant_gguf.block_codes(q.data, q.fmt).reshape(-1)[:n]
    key = (c << 1) | (delta.reshape(-1) > 0).long()
    return torch.take(_GAP["mxfp4"], key) * step


_TINY = float(torch.nextafter(torch.tensor(0.0), torch.tensor(1.0)))  # |x| < _TINY  <=>  x == 0


def below_half_step(q: QTensor, delta: torch.Tensor) -> int:
    """How many elements have ``|delta| < local_step / 2`` or ``delta == 0`` (the count from
    :func:`local_step`, computed with broadcast steps). Half steps are floored at the smallest
    positive float, which makes ``delta == 0`` count even where the step is 0."""
    n = delta.numel()
    ad = delta.reshape(-1).abs()
    bs = q.block_size
    if q.fmt in GGUF_FORMATS:
        return int(torch.count_nonzero(ad < (0.5 * _gguf_step(q, delta)).clamp_(min=_TINY)))
    if q.fmt in quant4.FORMATS_4BIT:
        half = torch.take(_HALF_GAP[q.fmt], _gap_key(q, delta))
        am = q.absmax()
        if n % bs == 0:
            lim = half.view(-1, bs).mul_(am[:, None]).view(-1)
        else:
            lim = half.mul_(am.repeat_interleave(bs)[:n])
        return int(torch.count_nonzero(ad < lim.clamp_(min=_TINY)))
    rows, inner = q.scales.shape[0], q.shape[-1]
    half = (0.5 * q.scales.reshape(rows, -1)).clamp_(min=_TINY)
    if q.fmt == "int8" or inner % bs == 0:
        return int(torch.count_nonzero(ad.view(rows, half.shape[1], -1) < half[:, :, None]))
    lim = half.repeat_interleave(bs, dim=1)[:, :inner].reshape(-1)
    return int(torch.count_nonzero(ad < lim))

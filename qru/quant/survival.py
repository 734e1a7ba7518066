"""Does an unlearning update survive weight quantization? Per-linear-layer survival analysis.

For every linear weight ``W`` (base) and update ``ΔW`` (``unlearned − base``, or the merged
LoRA update ``s·B·A`` of an adapter) and every format ``fmt`` (:data:`qru.quant.ALL_FORMATS`),
with ``W' = W + ΔW`` and ``D = deq(Q(W')) − deq(Q(W))``, all in fp32:

``delta_rel_norm``      ``‖ΔW‖ / ‖W‖`` (Frobenius).
``code_flip_frac``      fraction of weights whose stored code differs between ``Q(W)`` and
                        ``Q(W')``: the 4-bit nibble (nf4, fp4, int4, int4_sym, q4_0, q4_1, q4_k,
                        mxfp4), the 5-bit code (q5_0, q5_1) or the 8-bit code (int8, q8_0).
                        It compares code *indices*: when a block's absmax / group scale / int4
                        zero point changes, an unchanged index may decode to a new value (that
                        shows in ``survival_ratio``, not here), and a changed scale can flip codes
                        where ``ΔW = 0``. fp4's and mxfp4's two codes of zero (0 and 8) count as
                        one code.
``survival_ratio``      ``‖D‖ / ‖ΔW‖``.
``cosine``              ``⟨D, ΔW⟩ / (‖D‖ ‖ΔW‖)``; 0 when ``D = 0`` (and ``ΔW ≠ 0``).
``below_half_step_frac``  fraction of weights with ``|ΔW| < step / 2`` (``ΔW = 0`` always
                        counts), ``step`` the local quantization step at ``W`` under ``Q(W)``:
                        int4 / int4_sym: the group scale; int8: the row scale; q8_0, q4_0,
                        q4_1, q5_0, q5_1: ``|d|`` of the block; q4_k: ``d · sc`` of the
                        32-element sub-block; nf4 / fp4 / mxfp4: the block scale times the gap
                        from the level ``W`` is coded to, to the next codebook level in the
                        direction of ``ΔW`` (the only neighbour at the ends of the codebook;
                        ±0 codes are one level). A weight sitting on
                        its level needs ``|ΔW| ≥ step / 2`` to reach the next one; weights off the
                        grid can flip with less, so this is a proxy, not a flip count.
``projection``          ``⟨D, ΔW⟩ / ‖ΔW‖²``: the share of the update that survives, signed.

With calibration activations ``X`` (inputs of the linear in the *base* model, a bounded number
of token rows): ``out_cosine`` = cosine of ``X·Dᵀ`` and ``X·ΔWᵀ``, ``out_rel_err`` =
``‖X·Dᵀ − X·ΔWᵀ‖ / ‖X·ΔWᵀ‖``.

Zero update: a tensor with ``ΔW = 0`` has ``D = 0`` (quantization is deterministic), so
``code_flip_frac = 0``, ``below_half_step_frac = 1``, and ``survival_ratio``, ``cosine``,
``projection``, ``out_cosine``, ``out_rel_err`` are ``None`` (JSON ``null``): there is
nothing to survive. ``delta_rel_norm`` is ``None`` only for ``ΔW ≠ 0`` on an all-zero ``W``.
Likewise the output fields are ``None`` when ``X·ΔWᵀ = 0``.

Aggregates (``by_module_type``, ``by_layer_index``, ``overall``) are the metric of the
*concatenation* of the group's tensors: norms and inner products are summed before the
ratio (``survival = sqrt(Σ‖D‖² / Σ‖ΔW‖²)``, ``projection = Σ⟨D,ΔW⟩ / Σ‖ΔW‖²``, …) and
fractions are element-weighted. So big updates weigh more than the mean of per-tensor ratios
would let them, and ``ΔW = 0`` tensors add nothing but elements to the fractions. Each
aggregate also has ``n_tensors`` and ``numel``. Layer-less tensors (e.g. ``lm_head``) enter
``by_module_type`` and ``overall`` only.

Which tensors: 2-D floating ``*.weight`` tensors of the base checkpoint, except embeddings
(``embed_tokens``) and those matched by ``skip`` (a pattern equal to a dotted component of
the name, or an ``fnmatch`` pattern of the whole name). Row ``name`` is the module name
(``model.layers.0.self_attn.q_proj``).

Streaming: tensors are read one at a time with :class:`qru.model.checkpoint.ShardReader`
and processed in row chunks (block-aligned, so the codes equal whole-tensor quantization);
memory is about one bf16 tensor plus a few fp32 chunks. Sums of squares and inner products
are fp32 cascade sums per chunk (~1e-7 relative), accumulated in float64. Calibration runs the base model one
decoder layer at a time (the layer's weights in fp32, the hidden states of ``calib_rows``
tokens) and analyses that layer's tensors before loading the next. ``Q(W')`` quantizes the
unlearned weight itself (``ΔW`` is ``fp32(W') − fp32(W)``); with an adapter ``W'`` is the fp32
merge ``W + s·B·A`` (not rounded to the checkpoint dtype). With both an unlearned checkpoint
and an adapter, ``W'`` is the adapter merged into the unlearned weights. Nested (double)
absmax quantization is not modelled.

API: :func:`analyze` → report (the ``survival.json`` content), :func:`write_outputs`,
:func:`summary_table`, :func:`by_format`.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from qru.data import read_texts
from qru.io import check_output, staged_dir
from qru.kernels import quant4, quant_gguf
from qru.model.checkpoint import CheckpointError, ShardReader, checkpoint_files
from qru.quant.formats import ALL_FORMATS, DEFAULT_BLOCK_SIZE, GGUF_FORMATS, QTensor, quantize

METRICS = ("delta_rel_norm", "code_flip_frac", "survival_ratio", "cosine", "below_half_step_frac", "projection")
OUT_METRICS = ("out_cosine", "out_rel_err")
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
FILES = ("survival.json", "survival.csv", "survival_heatmap.png", "survival_bars.png")
DEFAULT_SKIP = ("lm_head",)
CHUNK_ELEMS = 1 << 22
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class SurvivalError(ValueError):
    """Unusable input for the survival analysis; the message names the culprit."""


# ----------------------------------------------------------------------------- sums → metrics


@dataclass
class Sums:
    """Additive statistics of one tensor (or group) under one format; metrics derive from these."""
    numel: int = 0
    w2: float = 0.0      # ‖W‖²
    d2: float = 0.0      # ‖ΔW‖²
    q2: float = 0.0      # ‖D‖²
    qd: float = 0.0      # ⟨D, ΔW⟩
    flips: int = 0
    below: int = 0
    yd2: float = 0.0     # ‖X ΔWᵀ‖²
    yq2: float = 0.0     # ‖X Dᵀ‖²
    yqd: float = 0.0     # ⟨X Dᵀ, X ΔWᵀ⟩
    err2: float = 0.0    # ‖X Dᵀ − X ΔWᵀ‖²
    has_out: bool = False
    n_tensors: int = 0

    def __iadd__(self, o: "Sums") -> "Sums":
        for f in fields(self):
            if f.name != "has_out":
                setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))
        return self


def metrics(s: Sums, out: bool) -> dict:
    """The metric fields of ``s`` (``out``: add the output-level fields)."""
    m = {
        "delta_rel_norm": math.sqrt(s.d2 / s.w2) if s.w2 > 0 else (0.0 if s.d2 == 0 else None),
        "code_flip_frac": s.flips / s.numel if s.numel else None,
        "survival_ratio": None, "cosine": None,
        "below_half_step_frac": s.below / s.numel if s.numel else None,
        "projection": None,
    }
    if s.d2 > 0:
        m["survival_ratio"] = math.sqrt(s.q2 / s.d2)
        m["cosine"] = s.qd / math.sqrt(s.q2 * s.d2) if s.q2 > 0 else 0.0
        m["projection"] = s.qd / s.d2
    if out:
        ok = s.has_out and s.yd2 > 0
        m["out_cosine"] = (s.yqd / math.sqrt(s.yq2 * s.yd2) if s.yq2 > 0 else 0.0) if ok else None
        m["out_rel_err"] = math.sqrt(s.err2 / s.yd2) if ok else None
    return m


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def aggregate(rows: Sequence[tuple[str, Sums]], out: bool) -> tuple[dict, dict, dict]:
    """(by_module_type, by_layer_index, overall) of ``(module name, Sums)`` rows."""
    by_type: dict[str, Sums] = {}
    by_layer: dict[int, Sums] = {}
    total = Sums(has_out=True)
    for name, s in rows:
        for key, d in ((module_type(name), by_type), (layer_index(name), by_layer)):
            if key is None:
                continue
            d.setdefault(key, Sums(has_out=True))
            d[key] += s
            d[key].has_out &= s.has_out
        total += s
        total.has_out &= s.has_out

    def fmt(s: Sums) -> dict:
        return {**metrics(s, out), "n_tensors": s.n_tensors, "numel": s.numel}

    types = sorted(by_type, key=lambda t: (MODULE_ORDER.index(t) if t in MODULE_ORDER else len(MODULE_ORDER), t))
    return ({t: fmt(by_type[t]) for t in types}, {str(i): fmt(by_layer[i]) for i in sorted(by_layer)}, fmt(total))


# ----------------------------------------------------------------------------- per-chunk math


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


def _sq(t: torch.Tensor) -> float:
    return float((t * t).sum())  # fp32 cascade sum: ~1e-7 relative, 10x cheaper than fp64


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def chunk_sums(w: torch.Tensor, wp: torch.Tensor, fmt: str, block_size: int | None,
               x: torch.Tensor | None = None, y_delta: torch.Tensor | None = None, *,
               d: torch.Tensor | None = None, w2: float | None = None, d2: float | None = None) -> Sums:
    """Statistics of one fp32 chunk: base rows ``w``, updated rows ``wp``; ``x`` the calibration
    inputs (N, in) and ``y_delta = x @ (wp - w)ᵀ`` (computed if omitted). ``d``, ``w2``, ``d2``:
    ``wp - w`` and the squared norms, when the caller has them already."""
    d = wp - w if d is None else d
    s = Sums(numel=w.numel(), w2=_sq(w) if w2 is None else w2, d2=_sq(d) if d2 is None else d2,
             has_out=x is not None)
    if s.d2 == 0:
        s.below = s.numel
        return s
    qa, qb = quantize(w, fmt, block_size), quantize(wp, fmt, block_size)
    dq = qb.dequantize(torch.float32)
    dq -= qa.dequantize(torch.float32)
    s.q2, s.qd = _sq(dq), _dot(dq, d)
    s.flips = code_flips(qa, qb)
    s.below = below_half_step(qa, d)
    if x is not None:
        yd = x @ d.T if y_delta is None else y_delta
        yq = x @ dq.T
        s.yd2, s.yq2, s.yqd, s.err2 = _sq(yd), _sq(yq), _dot(yq, yd), _sq(yq - yd)
    return s


def row_chunk(shape: Sequence[int], formats: Sequence[str], block_size: Mapping[str, int | None],
              max_elems: int = CHUNK_ELEMS) -> int:
    """Rows per chunk: about ``max_elems`` elements, and a whole number of 4-bit / GGUF blocks so
    the chunked codes equal whole-tensor quantization (integer formats group within rows)."""
    rows, inner = shape
    m = 1
    for f in formats:
        if f in quant4.FORMATS_4BIT or f in GGUF_FORMATS:
            b = block_size[f]
            m = math.lcm(m, b // math.gcd(inner, b))
    r = max(m, (max(1, max_elems // max(inner, 1)) // m) * m)
    return min(r, rows)


# ----------------------------------------------------------------------------- inputs


class TensorIndex:
    """Tensor name → shard reader over a checkpoint directory (headers only)."""

    def __init__(self, path: str | os.PathLike, role: str = "checkpoint"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{role} directory not found: {self.path}")
        self.readers: dict[str, ShardReader] = {}
        self.order: list[str] = []
        for f in checkpoint_files(self.path):
            r = ShardReader(f)
            for k in r.keys():
                if k in self.readers:
                    raise CheckpointError(f"{f}: tensor {k!r} also appears in {self.readers[k].path.name}")
                self.readers[k] = r
                self.order.append(k)

    def __contains__(self, name: str) -> bool:
        return name in self.readers

    def shape(self, name: str) -> tuple[int, ...]:
        return self.readers[name].shape(name)

    def dtype(self, name: str) -> str:
        return self.readers[name].header[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.readers:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self.readers[name].get(name)


def _skipped(name: str, skip: Sequence[str]) -> bool:
    parts = name.split(".")
    return any(p in parts or fnmatch.fnmatchcase(name, p) for p in skip)


def linear_names(index: TensorIndex, skip: Sequence[str] = DEFAULT_SKIP) -> list[str]:
    """The analysed weight names, sorted by layer index (layer-less last), then checkpoint order."""
    names = [k for k in index.order
             if k.endswith(".weight") and len(index.shape(k)) == 2 and index.dtype(k) in ("F32", "F16", "BF16")
             and "embed_tokens" not in k.split(".") and not _skipped(k[: -len(".weight")], skip)]
    pos = {k: i for i, k in enumerate(index.order)}
    big = 1 << 30
    return sorted(names, key=lambda k: (layer_index(k) if layer_index(k) is not None else big, pos[k]))


def _finite(name: str, t: torch.Tensor, where: str, row0: int = 0) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        if first and row0:
            first[0] += row0
        raise SurvivalError(f"{where}tensor {name!r} has non-finite value(s) (NaN or Inf), "
                            f"first at index {tuple(first)}")


def load_adapter_updates(adapter: str | os.PathLike, base: TensorIndex) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Base weight name → (A fp32, B fp32, scale) of a PEFT LoRA adapter, checked against ``base``."""
    from qru.model.lora import AdapterError, adapter_scales, map_adapter_keys, read_adapter

    cfg, sd = read_adapter(adapter)
    if not sd:
        raise AdapterError(f"{adapter}: adapter has no tensors")
    scales = adapter_scales(sd, cfg)
    out = {}
    for wkey, (akey, bkey) in map_adapter_keys(sd.keys()).items():
        if wkey not in base:
            raise AdapterError(f"adapter key {akey!r}: the base checkpoint {base.path} has no tensor {wkey!r}")
        A, B = sd[akey].float(), sd[bkey].float()
        out_f, in_f = base.shape(wkey)
        if A.dim() != 2 or A.shape[1] != in_f:
            raise AdapterError(f"adapter key {akey!r} has shape {tuple(A.shape)}, expected (r, {in_f}) for {wkey!r}")
        if B.dim() != 2 or tuple(B.shape) != (out_f, A.shape[0]):
            raise AdapterError(f"adapter key {bkey!r} has shape {tuple(B.shape)}, expected ({out_f}, {A.shape[0]})")
        _finite(akey, A, f"{adapter}: adapter ")
        _finite(bkey, B, f"{adapter}: adapter ")
        out[wkey] = (A, B, scales[wkey])
    return out


# ----------------------------------------------------------------------------- calibration


def calib_texts(path: str | os.PathLike) -> list[str]:
    """Texts of a calibration source (:func:`qru.data.read_texts`): a ``.txt`` file, a JSON / JSON Lines
    file (records with ``text``, ``question``+``answer``, ``prompt``+``gt``, or plain strings), or a
    directory: its ``raw/*.txt`` or ``*.txt`` if any, else every ``*.json``/``*.jsonl`` below it (MUSE
    layout; ``meta.json`` excluded), sorted by path."""
    if not Path(path).exists():
        raise FileNotFoundError(f"calibration data not found: {path}")
    return read_texts(path)


def calib_ids(texts: Sequence[str], tokenizer, rows: int, seq_len: int) -> torch.Tensor:
    """Token ids (S, T) for calibration: each text as ``bos + tokens + eos``, concatenated and
    cut into ``ceil(rows / seq_len)`` sequences of ``seq_len`` (fewer if the text runs out; one
    shorter sequence if there is less than ``seq_len``)."""
    need = -(-rows // seq_len) * seq_len
    stream: list[int] = []
    for t in texts:
        stream += tokenizer.encode(t, bos=True, eos=True)
        if len(stream) >= need:
            break
    if len(stream) < 2:
        raise SurvivalError("calibration data tokenizes to fewer than 2 tokens")
    if len(stream) < seq_len:
        return torch.tensor([stream], dtype=torch.long)
    n = min(need, len(stream) // seq_len * seq_len)
    return torch.tensor(stream[:n], dtype=torch.long).view(-1, seq_len)


def _rope(cfg, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, head_dim) for positions 0..T-1, as ``Llama.forward`` builds them."""
    from qru.model.config import rope_inv_freq

    pos = torch.arange(T).expand(B, T)
    freqs = pos[:, :, None].float() * rope_inv_freq(cfg)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@torch.no_grad()
def stream_inputs(base_dir: str | os.PathLike, ids: torch.Tensor, rows: int, *, final: bool = False,
                  index: TensorIndex | None = None) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    """Run the base model one decoder layer at a time (fp32) on ``ids`` and yield, per layer,
    ``(layer index, {linear module name: its input, first rows × in})``; with ``final`` a last
    ``(None, {"lm_head": final-norm output})``. Only one layer's weights are held."""
    from qru.model.config import LlamaConfig
    from qru.model.llama import DecoderLayer, RMSNorm

    base_dir = Path(base_dir)
    cfg = LlamaConfig.from_json(base_dir / "config.json")
    index = index or TensorIndex(base_dir, "base checkpoint")
    emb = index.get("model.embed_tokens.weight")
    x = emb[ids].float()
    del emb
    cos, sin = _rope(cfg, *ids.shape)

    def grab(mods, into):
        # q/k/v (gate/up) share one input: store it once. The inputs are held (not keyed by
        # id(), which a freed tensor's successor may reuse) until the layer is done.
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hooks = []
        for name, m in mods:
            def hook(_m, inp, _out, name=name):
                t = inp[0]
                hit = next((c for u, c in seen if u is t), None)
                if hit is None:
                    hit = t.reshape(-1, t.shape[-1])[:rows].float().clone()
                    seen.append((t, hit))
                into[name] = hit
            hooks.append(m.register_forward_hook(hook))
        return hooks

    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        with torch.device("meta"):
            layer = DecoderLayer(cfg, i)
        sd = {k: index.get(prefix + k).float() for k in layer.state_dict()}
        layer.load_state_dict(sd, assign=True)
        del sd
        got: dict[str, torch.Tensor] = {}
        hooks = grab([(prefix + n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)], got)
        x = layer(x, cos, sin, None, None)
        for h in hooks:
            h.remove()
        del layer
        yield i, got
    if final:
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        norm.weight.data = index.get("model.norm.weight").float()
        yield None, {"lm_head": norm(x).reshape(-1, cfg.hidden_size)[:rows].clone()}


# ----------------------------------------------------------------------------- analysis


def _parse_formats(formats) -> list[str]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(dict.fromkeys(formats))
    if not formats:
        raise SurvivalError(f"no format given (choose from {', '.join(ALL_FORMATS)})")
    for f in formats:
        if f not in ALL_FORMATS:
            raise SurvivalError(f"unknown format {f!r} (choose from {', '.join(ALL_FORMATS)})")
    return formats


def _block_sizes(formats: Sequence[str], block_size: int | None) -> dict[str, int | None]:
    if block_size is not None:
        try:
            quant4.check_block_size(block_size)
        except ValueError:
            raise SurvivalError(f"block_size must be a power of two between 32 and 4096, got {block_size!r}") from None
    # int8 is per row; GGUF formats have a fixed block (a given block_size does not apply to them)
    return {f: None if f == "int8" else DEFAULT_BLOCK_SIZE[f] if f in GGUF_FORMATS
            else (block_size or DEFAULT_BLOCK_SIZE[f]) for f in formats}


def analyze(base_dir: str | os.PathLike, unlearned_dir: str | os.PathLike | None = None, *,
            adapter: str | os.PathLike | None = None, formats: Sequence[str] | str = ("nf4",),
            block_size: int | None = None, calib: str | os.PathLike | None = None, calib_rows: int = 512,
            calib_seq_len: int = 256, skip: Sequence[str] = DEFAULT_SKIP, progress: bool = True,
            chunk_elems: int = CHUNK_ELEMS) -> dict:
    """Survival of ``ΔW`` under each format, per linear layer; returns the ``survival.json``
    content: one report ``{"format", "block_size", "layers", "by_module_type",
    "by_layer_index", "overall"}`` for one format, else ``{fmt: report}``.

    ``unlearned_dir`` and/or ``adapter`` (PEFT LoRA dir) define ``W'``; ``block_size`` applies
    to every format but int8 (per row; reported as null) and the GGUF formats (fixed blocks);
    ``calib`` (text / JSON / MUSE dir, tokenized with the tokenizer in ``base_dir``) adds
    ``out_cosine`` / ``out_rel_err`` using the
    inputs of ``calib_rows`` tokens (sequences of ``calib_seq_len``); ``skip``: name patterns.
    Raises :class:`SurvivalError` / :class:`CheckpointError` / ``FileNotFoundError`` naming the culprit.
    """
    from qru.model.lora import merge_weight

    fmts = _parse_formats(formats)
    blocks = _block_sizes(fmts, block_size)
    if isinstance(skip, str):
        skip = [skip]
    if unlearned_dir is None and adapter is None:
        raise SurvivalError("give an unlearned checkpoint, an adapter, or both")
    if calib_rows < 1 or calib_seq_len < 1:
        raise SurvivalError(f"calib_rows and calib_seq_len must be >= 1, got {calib_rows}, {calib_seq_len}")
    base = TensorIndex(base_dir, "base checkpoint")
    unl = TensorIndex(unlearned_dir, "unlearned checkpoint") if unlearned_dir is not None else None
    upd = load_adapter_updates(adapter, base) if adapter is not None else {}
    if calib is not None and not Path(calib).exists():
        raise FileNotFoundError(f"calibration data not found: {calib}")
    names = linear_names(base, skip)
    if not names:
        raise SurvivalError(f"{base.path}: no linear weights to analyse (skip={list(skip)})")
    if unl is not None:
        for k in names:
            if k not in unl:
                raise CheckpointError(f"unlearned checkpoint {unl.path} has no tensor {k!r}")
            if unl.shape(k) != base.shape(k):
                raise CheckpointError(f"tensor {k!r} has shape {unl.shape(k)} in the unlearned checkpoint "
                                      f"but {base.shape(k)} in the base")
    if any(f.startswith("int4") for f in fmts):
        for k in names:
            if base.shape(k)[1] % 2:
                raise SurvivalError(f"tensor {k!r} has an odd number of columns ({base.shape(k)[1]}); "
                                    f"int4 formats need an even count")

    calib_iter = None
    if calib is not None:
        from qru.model.config import LlamaConfig
        from qru.model.tokenizer import load_tokenizer

        cfg = LlamaConfig.from_json(Path(base_dir) / "config.json")
        tok = load_tokenizer(base_dir)
        ids = calib_ids(calib_texts(calib), tok, calib_rows, min(calib_seq_len, cfg.max_position_embeddings))
        final = any(module_type(k[: -len(".weight")]) == "lm_head" for k in names)
        calib_iter = stream_inputs(base_dir, ids, calib_rows, final=final, index=base)
    captured: dict[str, torch.Tensor] = {}
    cur_layer: int | None = -1

    def inputs_for(module: str) -> torch.Tensor | None:
        nonlocal captured, cur_layer
        if calib_iter is None:
            return None
        li = layer_index(module)
        while cur_layer is not None and (li is None or cur_layer < li):
            try:
                cur_layer, captured = next(calib_iter)
            except StopIteration:
                cur_layer = None
        return captured.get(module if li is not None else module_type(module))

    results: dict[str, list[tuple[str, Sums]]] = {f: [] for f in fmts}
    t0 = time.perf_counter()
    for i, key in enumerate(names):
        module = key[: -len(".weight")]
        W = base.get(key)
        Wt = unl.get(key) if unl is not None else None
        lora = upd.get(key)
        x = inputs_for(module)
        sums = {f: Sums(has_out=x is not None, n_tensors=1) for f in fmts}
        rows = row_chunk(W.shape, fmts, blocks, chunk_elems)
        for r0 in range(0, W.shape[0], rows):
            w = W[r0:r0 + rows].float()
            wp = Wt[r0:r0 + rows].float() if Wt is not None else w
            if lora is not None:
                A, B, s = lora
                wp = merge_weight(wp, A, B[r0:r0 + rows], s)  # fp32 in, fp32 out
            d = wp - w
            w2, d2 = _sq(w), _sq(d)
            if not math.isfinite(w2):
                _finite(key, w, f"{base.path}: ", r0)
            if not math.isfinite(d2):
                if Wt is not None:
                    _finite(key, Wt[r0:r0 + rows], f"{unl.path}: ", r0)
                _finite(key, wp, f"{adapter} merged into the weights: ", r0)
            yd = x @ d.T if x is not None and d2 > 0 else None
            for f in fmts:
                try:
                    sums[f] += chunk_sums(w, wp, f, blocks[f], x, yd, d=d, w2=w2, d2=d2)
                except ValueError as e:
                    raise SurvivalError(f"tensor {key!r}: {e}") from None
        for f in fmts:
            results[f].append((module, sums[f]))
        del W, Wt
        if progress:
            print(f"[survival {i + 1}/{len(names)}] {module} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr,
                  flush=True)
    if calib_iter is not None:
        calib_iter.close()

    out = calib is not None
    reports = {}
    for f in fmts:
        by_type, by_layer, overall = aggregate(results[f], out)
        reports[f] = {"format": f, "block_size": blocks[f],
                      "layers": [{"name": n, **metrics(s, out)} for n, s in results[f]],
                      "by_module_type": by_type, "by_layer_index": by_layer, "overall": overall}
    return reports[fmts[0]] if len(fmts) == 1 else reports


# ----------------------------------------------------------------------------- outputs


def by_format(report: Mapping) -> dict[str, dict]:
    """``{fmt: report}`` for either shape of :func:`analyze`'s result."""
    if "format" in report and "layers" in report:
        return {report["format"]: dict(report)}
    return dict(report)


def _csv_text(report: Mapping) -> str:
    buf = io.StringIO()
    reps = by_format(report)
    out = any("out_cosine" in r for rep in reps.values() for r in rep["layers"])
    cols = ["format", "block_size", "name", "layer_index", "module_type", *METRICS, *(OUT_METRICS if out else ())]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for f, rep in reps.items():
        for r in rep["layers"]:
            li = layer_index(r["name"] + ".")
            w.writerow([f, "" if rep["block_size"] is None else rep["block_size"], r["name"],
                        "" if li is None else li, module_type(r["name"]),
                        *("" if r.get(c) is None else repr(r[c]) for c in cols[5:])])
    return buf.getvalue()


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _plots(report: Mapping, heatmap: Path, bars: Path, metric: str = "survival_ratio") -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    reps = by_format(report)
    n = len(reps)
    types = list(dict.fromkeys(t for rep in reps.values() for t in rep["by_module_type"]))
    layers = sorted({layer_index(r["name"] + ".") for rep in reps.values() for r in rep["layers"]} - {None})
    grids = {}
    for f, rep in reps.items():
        g = np.full((max(len(layers), 1), max(len(types), 1)), np.nan)
        for r in rep["layers"]:
            li = layer_index(r["name"] + ".")
            if li is not None:
                g[layers.index(li), types.index(module_type(r["name"]))] = _num(r[metric])
        grids[f] = g
    finite = [v for g in grids.values() for v in g[np.isfinite(g)].ravel()]
    vmax = max(1.0, max(finite)) if finite else 1.0
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 0.9 * max(len(types), 1) * n, 1.5 + 0.28 * max(len(layers), 1)),
                             squeeze=False)
    for ax, (f, g) in zip(axes[0], grids.items()):
        im = ax.imshow(np.ma.masked_invalid(g), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                       interpolation="nearest")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        ax.set_xlabel("module type")
        ax.set_ylabel("layer index")
        ax.set_title(f"{metric} ({f}, block {reps[f]['block_size'] or 'per row'})", fontsize=9)
        if len(layers) <= 24:
            for (a, b), v in np.ndenumerate(g):
                if np.isfinite(v):
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.5 * vmax else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(heatmap, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.5 + 0.4 * max(len(types), 1) * n), 6.5), squeeze=False)
    width = 0.8 / n
    for ax, m in zip(axes[:, 0], ("survival_ratio", "projection")):
        for j, (f, rep) in enumerate(reps.items()):
            vals = [_num(rep["by_module_type"].get(t, {}).get(m)) for t in types]
            ax.bar([i + (j - (n - 1) / 2) * width for i in range(len(types))], vals, width, label=f)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{m} by module type (norm-weighted)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(bars, dpi=110)
    plt.close(fig)


def write_outputs(report: Mapping, out_dir: str | os.PathLike, *, overwrite: bool = False,
                  inputs: Mapping | None = None) -> dict[str, Path]:
    """Write ``survival.json``, ``survival.csv``, ``survival_heatmap.png`` (layer index × module
    type of survival_ratio, one panel per format) and ``survival_bars.png`` (survival_ratio and
    projection per module type) into ``out_dir``: staged and committed with one rename
    (:mod:`qru.io`). An existing non-empty ``out_dir`` needs ``overwrite``; ``inputs`` (role -> path)
    are refused as, inside or around ``out_dir``. Returns name → final path."""
    out_dir = check_output(out_dir, inputs or {}, overwrite=overwrite)
    with staged_dir(out_dir) as stage:
        (stage / FILES[0]).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        (stage / FILES[1]).write_text(_csv_text(report))
        _plots(report, stage / FILES[2], stage / FILES[3])
    return {f: out_dir / f for f in FILES}


def summary_table(report: Mapping) -> str:
    """A plain-text table per format: each module type and the overall aggregate."""
    lines = []
    for f, rep in by_format(report).items():
        out = "out_cosine" in rep["overall"]
        cols = ["delta_rel", "flips", "survival", "cosine", "<half", "proj"] + (["out_cos", "out_err"] if out else [])
        keys = list(METRICS) + (list(OUT_METRICS) if out else [])
        lines.append(f"\n{f} (block {rep['block_size'] or 'per row'}): {len(rep['layers'])} tensors")
        rows = [(t, a) for t, a in rep["by_module_type"].items()] + [("overall", rep["overall"])]
        width = max(9, *(len(t) for t, _ in rows))
        lines.append(" ".join([" " * width] + [c.rjust(9) for c in cols]))
        for t, a in rows:
            cells = ["—".rjust(9) if a.get(k) is None else f"{a[k]:9.4g}" for k in keys]
            lines.append(" ".join([t.ljust(width)] + cells))
    return "\n".join(lines).lstrip("\n")

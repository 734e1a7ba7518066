"""llama.cpp (GGUF) block formats: ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k``, ``mxfp4``.

The tensor is flattened (row-major) and cut into blocks of :data:`BLOCK` elements (32, or 256
for ``q4_k``); a partial last block is padded with zeros. Each block is stored as llama.cpp's
``block_<type>`` struct, :data:`TYPE_SIZE` bytes, little-endian (layouts in docs/formats.md).
When the last dimension is a multiple of the block, the bytes equal
``gguf.quants.quantize(w, GGMLQuantizationType.<TYPE>)`` (llama.cpp's reference quantizers);
``q4_k`` (which ``gguf`` cannot quantize) follows ``quantize_row_q4_K_ref`` /
``make_qkx2_quants`` of ggml-quants.c, every fp32 operation in source order and none fused.
Dequantization equals ``gguf.quants.dequantize`` bit for bit, then rounds once to the
output dtype.

Quantization math per block (fp32; ``fp16()`` rounds to nearest even):

* ``q8_0``: ``d = amax / 127``, ``q = roundf(x / d)`` (half away from zero, via ``x * (1/d)``);
* ``q4_0`` / ``q5_0``: ``max`` = the first element of largest ``|x|``, ``d = max / -8`` (``-16``),
  ``q = min(15 (31), trunc(x * (1/d) + 8.5 (16.5)))``; ``w' = d (q - 8 (16))``;
* ``q4_1`` / ``q5_1``: ``d = (max - min) / 15 (31)``, ``q = trunc((x - min) * (1/d) + 0.5)``;
  ``w' = d q + m`` with ``m = fp16(min)``;
* ``mxfp4``: ``e = floor(log2 amax) + 125`` (E8M0; 0 for an all-zero block, and for
  ``amax < 2**-125`` where llama.cpp's cast is undefined), ``d = 2**(e - 128)``, ``q`` the first
  index minimising ``|k[q] d - x|`` over the doubled E2M1 values ``k``; ``w' = k[q] d``;
* ``q4_k``: per 32-element sub-block an asymmetric 4-bit fit (``make_qkx2_quants``, weights
  ``sqrt(mean x^2) + |x|``, 21 scale trials), scales and mins quantized to 6 bits against the
  super-block's fp16 ``d = max_scale / 63`` and ``dmin = max_min / 63``, then every element
  re-coded against the stored scales; ``w' = d sc q - dmin m``.

Implementations, equal bit for bit: the torch reference, Triton kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``) and ``csrc/quant_gguf.cpp``. :func:`quantize_gguf` /
:func:`dequantize_gguf` dispatch at call time (``QRU_BACKEND``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels.threads import with_kernel_team
from qru.kernels._triton_io import kernel_view, load_f32, store_f32

GGUF_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "mxfp4")
BLOCK = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q4_k": 256, "mxfp4": 32}
TYPE_SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q4_k": 144, "mxfp4": 17}
KIND = {f: i for i, f in enumerate(GGUF_FORMATS)}
# E2M1 values doubled (llama.cpp kvalues_mxfp4); index = 4-bit code
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def check_format(fmt: str) -> None:
    if fmt not in GGUF_FORMATS:
        raise ValueError(f"fmt must be one of {GGUF_FORMATS}, got {fmt!r}")


def n_blocks(fmt: str, n: int) -> int:
    """Blocks holding ``n`` elements (the last one zero-padded)."""
    return -(-n // BLOCK[fmt])


@functools.lru_cache(maxsize=None)
def _log2_thresholds() -> tuple[int, ...]:
    """Per fp32 biased exponent ``E``: the smallest bit pattern in ``[2**(E-127), 2**(E-126))``
    whose fp32 ``log2`` rounds up to ``E - 126`` (``2**31 - 1`` if none). So
    ``floor(fp32 log2(x)) = E - 127 + (bits >= thr[E])`` exactly, as numpy and log2f give it."""
    out = []
    for e in range(256):
        if e == 0 or e == 255:
            out.append(2**31 - 1)
            continue
        lo, hi = e << 23, (e << 23) + (1 << 23)  # search [lo, hi)
        top = e - 126

        def up(bits: int) -> bool:
            x = np.array([bits], dtype=np.uint32).view(np.float32)
            return bool(np.floor(np.log2(x))[0] >= top)

        if not up(hi - 1):
            out.append(2**31 - 1)
            continue
        a, b = lo, hi - 1  # up(b) true
        while a < b:
            mid = (a + b) // 2
            if up(mid):
                b = mid
            else:
                a = mid + 1
        out.append(a)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2 thresholds int32[256], mxfp4 values fp32[16]) on ``device``."""
    return (torch.tensor(_log2_thresholds(), dtype=torch.int32, device=device),
            torch.tensor(MXFP4_VALUES, dtype=torch.float32, device=device))


# ----------------------------------------------------------------------------- reference


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """fp32 [nb] -> uint8 [nb, 2] (fp16, round to nearest even, little-endian)."""
    return v.half().view(torch.int16).view(torch.uint8).view(-1, 2)


def _fp16_of(b: torch.Tensor) -> torch.Tensor:
    """uint8 [nb, 2] -> fp32 [nb]."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


def _pack_halves(q: torch.Tensor) -> torch.Tensor:
    """[nb, 32] codes -> [nb, 16] bytes: element j low nibble, element j + 16 high nibble."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)


def _u32_bytes(v: torch.Tensor) -> torch.Tensor:
    """int64 [nb] (< 2**32) -> uint8 [nb, 4], little-endian."""
    return torch.stack([(v >> (8 * k)) & 255 for k in range(4)], dim=1).to(torch.uint8)


def _blocks(x: torch.Tensor, fmt: str) -> torch.Tensor:
    flat = x.reshape(-1).float()
    b = BLOCK[fmt]
    pad = n_blocks(fmt, flat.numel()) * b - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, b)


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), exactly: ``floor(a) + floor(2 (a - floor(a)))``."""
    a = v.abs()
    f = torch.floor(a)
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """int32 ``floor(fp32 log2(a))`` for positive normal fp32 ``a`` (see :func:`_log2_thresholds`)."""
    thr, _ = _tables(a.device)
    bits = a.view(torch.int32)
    e = bits >> 23
    return e - 127 + (bits >= thr[e.long()]).int()


def mxfp4_exponent(amax: torch.Tensor) -> torch.Tensor:
    """E8M0 exponent (int32) of blocks with fp32 absmax ``amax``."""
    fl = floor_log2(amax)
    return torch.where(amax > 0, (fl + 125).clamp(0, 255), torch.zeros_like(fl))


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """``2**(e - 128)`` as fp32 (ggml's ``GGML_E8M0_TO_FP32_HALF``), ``e`` int32."""
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` (round half to even for |v| <= 2**22), as int32."""
    return torch.round(v).int()


def _make_qkx2(xb: torch.Tensor, w: torch.Tensor, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
               nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants`` (``use_mad = false``) over rows of ``xb`` [m, n] with weights ``w``:
    returns ``(scale [m], the_min [m] (= -min), L int32 [m, n])``. Sums are sequential in fp32."""
    m, n = xb.shape
    f32 = torch.float32
    mn = xb[:, 0].clone()
    mx = xb[:, 0].clone()
    sum_w = w[:, 0].clone()
    sum_x = sum_w * xb[:, 0]
    for i in range(1, n):
        xi = xb[:, i]
        mn = torch.where(xi < mn, xi, mn)
        mx = torch.where(xi > mx, xi, mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * xi
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = torch.tensor(float(nmax), dtype=f32) / rng
    scale = 1.0 / iscale
    L = _nearest_int(iscale[:, None] * (xb - mn[:, None])).clamp(0, nmax)
    best = torch.zeros(m, dtype=f32, device=xb.device)
    for i in range(n):
        diff = scale * L[:, i].float() + mn - xb[:, i]
        best = best + w[:, i] * (diff * diff)
    rmin32, rdelta32 = np.float32(rmin), np.float32(rdelta)
    for step in range(nstep + 1):
        num = float(np.float32(np.float32(rmin32 + np.float32(rdelta32 * np.float32(step))) + np.float32(nmax)))
        isc = torch.tensor(num, dtype=f32) / torch.where(flat, torch.ones_like(mx), mx - mn)  # min moves
        La = _nearest_int(isc[:, None] * (xb - mn[:, None])).clamp(0, nmax)
        Lf = La.float()
        s_l = torch.zeros(m, dtype=f32, device=xb.device)
        s_l2 = torch.zeros_like(s_l)
        s_xl = torch.zeros_like(s_l)
        for i in range(n):
            wl = w[:, i] * Lf[:, i]
            s_l = s_l + wl
            s_l2 = s_l2 + wl * Lf[:, i]
            s_xl = s_xl + wl * xb[:, i]
        D = sum_w * s_l2 - s_l * s_l
        pos = D > 0
        Ds = torch.where(pos, D, torch.ones_like(D))
        this_scale = (sum_w * s_xl - sum_x * s_l) / Ds
        this_min = (s_l2 * sum_x - s_l * s_xl) / Ds
        clampm = this_min > 0
        this_min = torch.where(clampm, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clampm, s_xl / torch.where(s_l2 == 0, torch.ones_like(s_l2), s_l2), this_scale)
        cur = torch.zeros_like(s_l)
        for i in range(n):
            diff = this_scale * Lf[:, i] + this_min - xb[:, i]
            cur = cur + w[:, i] * (diff * diff)
        better = pos & (cur < best) & ~flat
        L = torch.where(better[:, None], La, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, L


def _q4_k_reference(xb: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q4_K_ref`` over super-blocks ``xb`` [nb, 256] -> uint8 [nb, 144]."""
    nb = xb.shape[0]
    sub = xb.reshape(nb * 8, 32)
    sum_x2 = torch.zeros(nb * 8, dtype=torch.float32, device=xb.device)
    for i in range(32):
        sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
    av_x = torch.sqrt(sum_x2 / 32)
    weights = av_x[:, None] + sub.abs()
    scales, mins, L = _make_qkx2(sub, weights)
    scales, mins, L = scales.view(nb, 8), mins.view(nb, 8), L.view(nb, 8, 32)
    max_scale = torch.zeros(nb, dtype=torch.float32, device=xb.device)
    max_min = torch.zeros_like(max_scale)
    for j in range(8):
        max_scale = torch.where(scales[:, j] > max_scale, scales[:, j], max_scale)
        max_min = torch.where(mins[:, j] > max_min, mins[:, j], max_min)
    c63 = torch.tensor(63.0)
    inv_scale = torch.where(max_scale > 0, c63 / torch.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = torch.where(max_min > 0, c63 / torch.where(max_min > 0, max_min, 1.0), 0.0)
    ls = (_nearest_int(inv_scale[:, None] * scales) & 255).clamp(max=63)
    lm = (_nearest_int(inv_min[:, None] * mins) & 255).clamp(max=63)
    sc = torch.zeros(nb, 12, dtype=torch.int32, device=xb.device)
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    d16 = (max_scale / c63).half()
    dm16 = (max_min / c63).half()
    d = d16.float()[:, None] * ls.float()
    dm = dm16.float()[:, None] * lm.float()
    ok = d != 0
    Lr = _nearest_int((sub.view(nb, 8, 32) + dm[..., None]) / torch.where(ok, d, 1.0)[..., None]).clamp(0, 15)
    L = torch.where(ok[..., None], Lr, L).view(nb, 4, 2, 32).to(torch.uint8)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    head = torch.cat([d16.view(torch.int16).view(torch.uint8).view(nb, 2),
                      dm16.view(torch.int16).view(torch.uint8).view(nb, 2), sc.to(torch.uint8)], dim=1)
    return torch.cat([head, qs], dim=1)


def quantize_gguf_reference(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Pure-torch quantization of ``x`` (any shape, flattened) to flat uint8 blocks."""
    check_format(fmt)
    xb = _blocks(x, fmt)
    if fmt == "q4_k":
        return _q4_k_reference(xb).reshape(-1)
    if fmt == "q8_0":
        d = xb.abs().amax(1) / 127
        q = _roundf(xb * _inv(d)[:, None]).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], dim=1).reshape(-1)
    if fmt == "mxfp4":
        amax = xb.abs().amax(1)
        e = mxfp4_exponent(amax)
        d = e8m0_half(e)
        # the first code of least |k d - x| (a running minimum: no [blocks, 32, 16] temporary)
        best = (d[:, None] * 0.0 - xb).abs()
        q = torch.zeros(xb.shape, dtype=torch.int64, device=x.device)
        for k in range(1, 16):
            err = (d[:, None] * float(MXFP4_VALUES[k]) - xb).abs()
            better = err < best
            q = torch.where(better, k, q)
            best = torch.where(better, err, best)
        return torch.cat([e.to(torch.uint8)[:, None], _pack_halves(q)], dim=1).reshape(-1)
    if fmt in ("q4_0", "q5_0"):
        imax = xb.abs().argmax(1, keepdim=True)
        mx = torch.gather(xb, 1, imax)[:, 0]
        half = 8 if fmt == "q4_0" else 16
        d = mx / -half
        q = torch.trunc(xb * _inv(d)[:, None] + (half + 0.5)).clamp(0, 2 * half - 1).to(torch.int64)
        parts = [_fp16_bytes(d)]
    else:
        mx, mn = xb.amax(1), xb.amin(1)
        top = 15 if fmt == "q4_1" else 31
        d = (mx - mn) / top
        q = torch.trunc((xb - mn[:, None]) * _inv(d)[:, None] + 0.5).clamp(0, top).to(torch.int64)
        parts = [_fp16_bytes(d), _fp16_bytes(mn)]
    if fmt in ("q5_0", "q5_1"):
        bit = ((q >> 4) & 1) << torch.arange(32, device=x.device)
        parts.append(_u32_bytes(bit.sum(1)))
    parts.append(_pack_halves(q))
    return torch.cat(parts, dim=1).reshape(-1)


def _unpack_halves(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 16] bytes -> [nb, 32] int64 codes (inverse of :func:`_pack_halves`)."""
    return torch.cat([qs & 15, qs >> 4], dim=1).long()


def q4_k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed scale bytes [nb, 12] -> 6-bit (scales, mins) int64 [nb, 8] (``get_scale_min_k4``)."""
    s = sc.long()
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([d & 63, (md & 0xF) | ((d >> 6) << 4)], dim=1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=1)
    return scales, mins


def block_codes(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-element integer codes [nb, block] of flat blocks ``data`` (q8_0: -128..127; q5: 0..31;
    others 0..15), in element order."""
    check_format(fmt)
    b = data.view(-1, TYPE_SIZE[fmt])
    if fmt == "q8_0":
        return b[:, 2:].contiguous().view(torch.int8).long()
    if fmt == "mxfp4":
        return _unpack_halves(b[:, 1:])
    if fmt == "q4_k":
        qs = b[:, 16:].reshape(-1, 4, 32).long()
        return torch.stack([qs & 15, qs >> 4], dim=2).reshape(-1, 256)
    off = 2 if fmt.endswith("_0") else 4
    if fmt.startswith("q4"):
        return _unpack_halves(b[:, off:])
    qh = b[:, off:off + 4].long()
    qh = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
    hi = (qh[:, None] >> torch.arange(32, device=data.device)) & 1
    return _unpack_halves(b[:, off + 4:]) | (hi << 4)


def block_affine(data: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(scale, offset)`` per element group for the uniform formats: ``w' = scale * q + offset``
    with ``q`` from :func:`block_codes` ([nb, 1] for 32-blocks, [nb, 8] per q4_k sub-block; the
    value is computed in exactly this order, so it matches :func:`dequantize_gguf_reference`).
    mxfp4 is not affine (returns the E8M0 half-scale and 0)."""
    check_format(fmt)
    b = data.view(-1, TYPE_SIZE[fmt])
    if fmt == "mxfp4":
        d = e8m0_half(b[:, 0].int())
        return d[:, None], torch.zeros_like(d)[:, None]
    d = _fp16_of(b[:, 0:2])
    if fmt == "q4_k":
        sc, mn = q4_k_scale_min(b[:, 4:16])
        return d[:, None] * sc.float(), -(_fp16_of(b[:, 2:4])[:, None] * mn.float())
    if fmt in ("q4_1", "q5_1"):
        return d[:, None], _fp16_of(b[:, 2:4])[:, None]
    return d[:, None], torch.zeros_like(d)[:, None]


def dequantize_gguf_reference(data: torch.Tensor, fmt: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Pure-torch dequantization of flat blocks to a flat ``dtype`` tensor of ``n`` elements."""
    check_format(fmt)
    b = data.view(-1, TYPE_SIZE[fmt])
    q = block_codes(data, fmt)
    if fmt == "q8_0":
        out = q.float() * _fp16_of(b[:, :2])[:, None]
    elif fmt == "mxfp4":
        _, kv = _tables(data.device)
        out = e8m0_half(b[:, 0].int())[:, None] * kv[q]
    elif fmt == "q4_k":
        d = _fp16_of(b[:, 0:2])[:, None]
        dmin = _fp16_of(b[:, 2:4])[:, None]
        sc, mn = q4_k_scale_min(b[:, 4:16])
        out = ((d * sc.float())[:, :, None] * q.view(-1, 8, 32).float()
               - (dmin * mn.float())[:, :, None]).reshape(-1, 256)
    else:
        d = _fp16_of(b[:, :2])[:, None]
        if fmt in ("q4_0", "q5_0"):
            out = d * (q - (8 if fmt == "q4_0" else 16)).float()
        else:
            out = d * q.float() + _fp16_of(b[:, 2:4])[:, None]
    return out.reshape(-1)[:n].to(dtype)


# ----------------------------------------------------------------------------- Triton


# Plain fp32 ops; the launches pass ``enable_fp_fusion=False`` so that no multiply feeds an add
# through an FMA (the results must round like ggml's reference C).
@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sub(a, b):
    return a - b


@triton.jit
def _load_fp16(ptr, mask):
    """fp32 of the little-endian fp16 at byte ``ptr`` (masked lanes: 0)."""
    h = tl.load(ptr, mask=mask, other=0).to(tl.int32) | (tl.load(ptr + 1, mask=mask, other=0).to(tl.int32) << 8)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp16_lo_hi(v):
    """fp32 -> (low byte, high byte) of its fp16 (round to nearest even), as int32."""
    h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h & 255, h >> 8


@triton.jit
def _gguf_quant_kernel(x_ptr, out_ptr, thr_ptr, kv_ptr, n, nb,
                       KIND: tl.constexpr, TS: tl.constexpr, ROWS: tl.constexpr, IN_BF16: tl.constexpr):
    # KIND: 0 q8_0, 1 q4_0, 2 q4_1, 3 q5_0, 4 q5_1, 6 mxfp4 (32-element blocks)
    blk = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    bok = blk < nb
    col = tl.arange(0, 32)
    offs = blk.to(tl.int64)[:, None] * 32 + col[None, :]
    x = load_f32(x_ptr, offs, (offs < n) & bok[:, None], IN_BF16)  # the zero padding
    ob = out_ptr + blk.to(tl.int64) * TS
    if KIND == 0:
        d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full((ROWS,), 127.0, tl.float32))
        inv = tl.where(d == 0, 0.0, tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.where(d == 0, 1.0, d)))
        v = _mul(x, inv[:, None])
        a = tl.abs(v)
        f = tl.math.floor(a)
        r = f + tl.math.floor(2.0 * (a - f))
        q = tl.where(v < 0, -r, r).to(tl.int32)
        lo, hi = _fp16_lo_hi(d)
        tl.store(ob, lo.to(tl.uint8), mask=bok)
        tl.store(ob + 1, hi.to(tl.uint8), mask=bok)
        tl.store(ob[:, None] + 2 + col[None, :], (q & 255).to(tl.uint8), mask=bok[:, None])
    else:
        if KIND == 6:
            am = tl.max(tl.abs(x), axis=1)
            bits = am.to(tl.int32, bitcast=True)
            ex = bits >> 23
            fl = ex - 127 + (bits >= tl.load(thr_ptr + ex)).to(tl.int32)
            e = tl.where(am > 0, tl.minimum(tl.maximum(fl + 125, 0), 255), 0)
            d = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
            best = tl.abs(0.0 * d[:, None] - x)
            q = tl.zeros((ROWS, 32), dtype=tl.int32)
            for k in tl.static_range(1, 16):
                err = tl.abs(_sub(tl.load(kv_ptr + k) * d[:, None], x))
                q = tl.where(err < best, k, q)
                best = tl.minimum(err, best)
            tl.store(ob, e.to(tl.uint8), mask=bok)
            qoff = 1
        elif KIND == 1 or KIND == 3:
            HALF: tl.constexpr = 8.0 if KIND == 1 else 16.0
            TOP: tl.constexpr = 15 if KIND == 1 else 31
            ax = tl.abs(x)
            imax = tl.argmax(ax, axis=1, tie_break_left=True)
            xbits = x.to(tl.int32, bitcast=True)
            mbits = tl.max(tl.where(col[None, :] == imax[:, None], xbits, -2147483648), axis=1)
            d = tl.math.div_rn(mbits.to(tl.float32, bitcast=True), tl.full((ROWS,), -HALF, tl.float32))
            inv = tl.where(d == 0, 0.0, tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.where(d == 0, 1.0, d)))
            v = _add(_mul(x, inv[:, None]), HALF + 0.5)
            q = tl.minimum(tl.maximum(v.to(tl.int32), 0), TOP)
            lo, hi = _fp16_lo_hi(d)
            tl.store(ob, lo.to(tl.uint8), mask=bok)
            tl.store(ob + 1, hi.to(tl.uint8), mask=bok)
            qoff = 2
        else:
            TOP2: tl.constexpr = 15 if KIND == 2 else 31
            mx = tl.max(x, axis=1)
            mn = tl.min(x, axis=1)
            d = tl.math.div_rn(mx - mn, tl.full((ROWS,), TOP2 * 1.0, tl.float32))
            inv = tl.where(d == 0, 0.0, tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.where(d == 0, 1.0, d)))
            v = _add(_mul(x - mn[:, None], inv[:, None]), 0.5)
            q = tl.minimum(tl.maximum(v.to(tl.int32), 0), TOP2)
            lo, hi = _fp16_lo_hi(d)
            tl.store(ob, lo.to(tl.uint8), mask=bok)
            tl.store(ob + 1, hi.to(tl.uint8), mask=bok)
            lo, hi = _fp16_lo_hi(mn)
            tl.store(ob + 2, lo.to(tl.uint8), mask=bok)
            tl.store(ob + 3, hi.to(tl.uint8), mask=bok)
            qoff = 4
        if KIND == 3 or KIND == 4:
            qh = tl.sum(((q >> 4) & 1) << col[None, :], axis=1)
            for k in tl.static_range(4):
                tl.store(ob + qoff + k, ((qh >> (8 * k)) & 255).to(tl.uint8), mask=bok)
            qoff = qoff + 4
        lo16, hi16 = tl.split(tl.permute(tl.reshape(q & 15, (ROWS, 2, 16)), (0, 2, 1)))
        j = tl.arange(0, 16)
        tl.store(ob[:, None] + qoff + j[None, :], (lo16 | (hi16 << 4)).to(tl.uint8), mask=bok[:, None])


@triton.jit
def _gguf_dequant_kernel(data_ptr, out_ptr, n, nb, KIND: tl.constexpr, TS: tl.constexpr, B: tl.constexpr,
                         ROWS: tl.constexpr, OUT_BF16: tl.constexpr):
    blk = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    bok = blk < nb
    col = tl.arange(0, B)
    base = data_ptr + blk.to(tl.int64)[:, None] * TS
    m2 = bok[:, None]
    if KIND == 5:  # q4_k
        chunk = col // 64
        p = col % 64
        sub = col // 32
        byte = tl.load(base + 16 + chunk[None, :] * 32 + (p % 32)[None, :], mask=m2, other=0).to(tl.int32)
        q = tl.where((p < 32)[None, :], byte & 15, byte >> 4)
        lo_j = tl.load(base + 4 + (sub % 4)[None, :], mask=m2, other=0).to(tl.int32)      # q[j] / q[j-4]
        mid_j = tl.load(base + 8 + (sub % 4)[None, :], mask=m2, other=0).to(tl.int32)     # q[j+4] (j < 4) / q[j]
        hi_j = tl.load(base + 12 + (sub % 4)[None, :], mask=m2, other=0).to(tl.int32)     # q[j+4] (j >= 4)
        low = (sub < 4)[None, :]
        sc = tl.where(low, lo_j & 63, (hi_j & 0xF) | ((lo_j >> 6) << 4))
        mn = tl.where(low, mid_j & 63, (hi_j >> 4) | ((mid_j >> 6) << 4))
        d = _load_fp16(base + 0, m2)
        dmin = _load_fp16(base + 2, m2)
        v = _sub(_mul(_mul(d, sc.to(tl.float32)), q.to(tl.float32)),
                             _mul(dmin, mn.to(tl.float32)))
    else:
        j = col % 16
        hi = col >= 16
        if KIND == 0:
            q = tl.load(base + 2 + col[None, :], mask=m2, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        else:
            QOFF: tl.constexpr = 1 if KIND == 6 else (2 if (KIND == 1 or KIND == 3) else 4)
            HOFF: tl.constexpr = 4 if (KIND == 3 or KIND == 4) else 0
            byte = tl.load(base + QOFF + HOFF + j[None, :], mask=m2, other=0).to(tl.int32)
            qi = tl.where(hi[None, :], byte >> 4, byte & 15)
            if KIND == 3 or KIND == 4:
                hb = tl.load(base + QOFF + (col // 8)[None, :], mask=m2, other=0).to(tl.int32)
                qi = qi | (((hb >> (col % 8)[None, :]) & 1) << 4)
        if KIND == 6:
            e = tl.load(base + 0, mask=m2, other=0).to(tl.int32)
            d = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
            mag = tl.where((qi & 7) < 5, (qi & 7).to(tl.float32),
                           tl.where((qi & 7) == 5, 6.0, tl.where((qi & 7) == 6, 8.0, 12.0)))
            kv = tl.where(qi >= 8, 0.0 - mag, mag)  # code 8 is +0.0, as in llama.cpp's int table
            v = _mul(d, kv)
        else:
            d = _load_fp16(base + 0, m2)
            if KIND == 0:
                v = _mul(q, d)
            elif KIND == 1:
                v = _mul(d, (qi - 8).to(tl.float32))
            elif KIND == 3:
                v = _mul(d, (qi - 16).to(tl.float32))
            else:
                m = _load_fp16(base + 2, m2)
                v = _add(_mul(d, qi.to(tl.float32)), m)
    eo = blk.to(tl.int64)[:, None] * B + col[None, :]
    store_f32(out_ptr, eo, v, (eo < n) & m2, OUT_BF16)


@triton.jit
def _nearest(v):
    """ggml's nearest_int as fp32 (round half to even, |v| <= 2**22)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _q4k_quant_kernel(x_ptr, out_ptr, n, nb, ROWS: tl.constexpr, IN_BF16: tl.constexpr):
    """``quantize_row_q4_K_ref`` for ROWS super-blocks: the S = 8 ROWS sub-blocks are the vector
    lanes; ggml's sequential fp32 sums run over the 32 columns, loaded one at a time."""
    S: tl.constexpr = ROWS * 8
    sb = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    sub = tl.program_id(0) * S + tl.arange(0, S)  # global sub-block index
    sok = sub < nb * 8
    base = sub.to(tl.int64) * 32
    col = tl.arange(0, 32)
    offs = base[:, None] + col[None, :]
    X = load_f32(x_ptr, offs, (offs < n) & sok[:, None], IN_BF16)
    zero = tl.zeros((S,), dtype=tl.float32)
    # weights: sqrt(sum x^2 / 32) + |x|
    sum_x2 = zero
    for i in range(32):
        xi = load_f32(x_ptr, base + i, ((base + i) < n) & sok, IN_BF16)
        sum_x2 = _add(sum_x2, _mul(xi, xi))
    av_x = tl.math.sqrt_rn(tl.math.div_rn(sum_x2, tl.full((S,), 32.0, tl.float32)))
    # make_qkx2_quants(32, 15, x, w, L, &min, Laux, -1, 0.1, 20, false)
    x0 = load_f32(x_ptr, base, (base < n) & sok, IN_BF16)
    mn = x0
    mx = x0
    sum_w = av_x + tl.abs(x0)
    sum_x = _mul(sum_w, x0)
    for i in range(1, 32):
        xi = load_f32(x_ptr, base + i, ((base + i) < n) & sok, IN_BF16)
        mn = tl.where(xi < mn, xi, mn)
        mx = tl.where(xi > mx, xi, mx)
        wi = av_x + tl.abs(xi)
        sum_w = _add(sum_w, wi)
        sum_x = _add(sum_x, _mul(wi, xi))
    mn = tl.where(mn > 0, 0.0, mn)
    flat = mx == mn
    one = tl.full((S,), 1.0, tl.float32)
    rng = tl.where(flat, one, mx - mn)
    iscale = tl.math.div_rn(tl.full((S,), 15.0, tl.float32), rng)
    scale = tl.math.div_rn(one, iscale)
    L = tl.minimum(tl.maximum(_nearest(_mul(iscale[:, None], X - mn[:, None])), 0.0), 15.0)
    best = zero
    for i in range(32):
        xi = load_f32(x_ptr, base + i, ((base + i) < n) & sok, IN_BF16)
        li = tl.minimum(tl.maximum(_nearest(_mul(iscale, xi - mn)), 0.0), 15.0)
        diff = _sub(_add(_mul(scale, li), mn), xi)
        best = _add(best, _mul(av_x + tl.abs(xi), _mul(diff, diff)))
    for step in range(21):
        stepv = zero + step  # fp32 (rmin + rdelta * is + nmax), as ggml rounds it
        num = _add(_add(tl.full((S,), -1.0, tl.float32), _mul(tl.full((S,), 0.1, tl.float32), stepv)), 15.0)
        isc = tl.math.div_rn(num, tl.where(flat, one, mx - mn))  # min moves with the best fit
        s_l = zero
        s_l2 = zero
        s_xl = zero
        for i in range(32):
            xi = load_f32(x_ptr, base + i, ((base + i) < n) & sok, IN_BF16)
            li = tl.minimum(tl.maximum(_nearest(_mul(isc, xi - mn)), 0.0), 15.0)
            wl = _mul(av_x + tl.abs(xi), li)
            s_l = _add(s_l, wl)
            s_l2 = _add(s_l2, _mul(wl, li))
            s_xl = _add(s_xl, _mul(wl, xi))
        D = _sub(_mul(sum_w, s_l2), _mul(s_l, s_l))
        pos = D > 0
        Ds = tl.where(pos, D, one)
        this_scale = tl.math.div_rn(_sub(_mul(sum_w, s_xl), _mul(sum_x, s_l)), Ds)
        this_min = tl.math.div_rn(_sub(_mul(s_l2, sum_x), _mul(s_l, s_xl)), Ds)
        cl = this_min > 0
        this_min = tl.where(cl, 0.0, this_min)
        this_scale = tl.where(cl, tl.math.div_rn(s_xl, tl.where(s_l2 == 0, one, s_l2)), this_scale)
        cur = zero
        for i in range(32):
            xi = load_f32(x_ptr, base + i, ((base + i) < n) & sok, IN_BF16)
            li = tl.minimum(tl.maximum(_nearest(_mul(isc, xi - mn)), 0.0), 15.0)
            diff = _sub(_add(_mul(this_scale, li), this_min), xi)
            cur = _add(cur, _mul(av_x + tl.abs(xi), _mul(diff, diff)))
        better = pos & (cur < best) & (flat == 0)
        La = tl.minimum(tl.maximum(_nearest(_mul(isc[:, None], X - mn[:, None])), 0.0), 15.0)
        L = tl.where(better[:, None], La, L)
        best = tl.where(better, cur, best)
        scale = tl.where(better, this_scale, scale)
        mn = tl.where(better, this_min, mn)
    L = tl.where(flat[:, None], 0.0, L)
    scale = tl.where(flat, 0.0, scale)
    mins = 0.0 - mn
    # super-block: 6-bit scales and mins against fp16 d, dmin
    sc2 = tl.reshape(scale, (ROWS, 8))
    mi2 = tl.reshape(mins, (ROWS, 8))
    max_scale = tl.max(tl.where(sc2 > 0, sc2, 0.0), axis=1)
    max_min = tl.max(tl.where(mi2 > 0, mi2, 0.0), axis=1)
    r1 = tl.full((ROWS,), 1.0, tl.float32)
    c63 = tl.full((ROWS,), 63.0, tl.float32)
    inv_scale = tl.where(max_scale > 0, tl.math.div_rn(c63, tl.where(max_scale > 0, max_scale, r1)), 0.0)
    inv_min = tl.where(max_min > 0, tl.math.div_rn(c63, tl.where(max_min > 0, max_min, r1)), 0.0)
    ls = tl.minimum(_nearest(_mul(inv_scale[:, None], sc2)).to(tl.int32) & 255, 63)
    lm = tl.minimum(_nearest(_mul(inv_min[:, None], mi2)).to(tl.int32) & 255, 63)
    d16 = tl.math.div_rn(max_scale, c63).to(tl.float16)
    dm16 = tl.math.div_rn(max_min, c63).to(tl.float16)
    dsub = _mul(d16.to(tl.float32)[:, None], ls.to(tl.float32))
    dmsub = _mul(dm16.to(tl.float32)[:, None], lm.to(tl.float32))
    dS = tl.reshape(dsub, (S,))
    dmS = tl.reshape(dmsub, (S,))
    ok = dS != 0
    Lr = tl.minimum(tl.maximum(_nearest(tl.math.div_rn(X + dmS[:, None], tl.where(ok, dS, one)[:, None])), 0.0), 15.0)
    L = tl.where(ok[:, None], Lr, L).to(tl.int32)
    # bytes
    bok = sb < nb
    ob = out_ptr + sb.to(tl.int64) * 144
    dh = d16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    mh = dm16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(ob, (dh & 255).to(tl.uint8), mask=bok)
    tl.store(ob + 1, (dh >> 8).to(tl.uint8), mask=bok)
    tl.store(ob + 2, (mh & 255).to(tl.uint8), mask=bok)
    tl.store(ob + 3, (mh >> 8).to(tl.uint8), mask=bok)
    j8 = tl.arange(0, 8)
    for j in tl.static_range(4):
        ls_lo = tl.sum(tl.where(j8[None, :] == j, ls, 0), axis=1)
        ls_hi = tl.sum(tl.where(j8[None, :] == j + 4, ls, 0), axis=1)
        lm_lo = tl.sum(tl.where(j8[None, :] == j, lm, 0), axis=1)
        lm_hi = tl.sum(tl.where(j8[None, :] == j + 4, lm, 0), axis=1)
        tl.store(ob + 4 + j, (ls_lo | ((ls_hi >> 4) << 6)).to(tl.uint8), mask=bok)
        tl.store(ob + 8 + j, (lm_lo | ((lm_hi >> 4) << 6)).to(tl.uint8), mask=bok)
        tl.store(ob + 12 + j, ((ls_hi & 15) | ((lm_hi & 15) << 4)).to(tl.uint8), mask=bok)
    L4 = tl.reshape(L, (ROWS, 4, 2, 32))
    lo, hi = tl.split(tl.permute(L4, (0, 1, 3, 2)))
    byte = (lo | (hi << 4)).to(tl.uint8)  # [ROWS, 4, 32]
    c4 = tl.arange(0, 4)
    l32 = tl.arange(0, 32)
    boffs = 16 + c4[None, :, None] * 32 + l32[None, None, :]
    tl.store(ob[:, None, None] + boffs, byte, mask=bok[:, None, None])


def _quantize_triton(x: torch.Tensor, fmt: str) -> torch.Tensor:
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    nb = n_blocks(fmt, n)
    out = torch.empty(nb * TYPE_SIZE[fmt], dtype=torch.uint8, device=x.device)
    if fmt == "q4_k":
        # the interpreter's cost is per program (sequential loops), so it gets few wide ones
        rows = 4 if x.is_cuda else min(64, triton.next_power_of_2(nb))
        _q4k_quant_kernel[(triton.cdiv(nb, rows),)](kernel_view(flat), out, n, nb, ROWS=rows,
                                                    IN_BF16=flat.dtype == torch.bfloat16, enable_fp_fusion=False)
        return out
    thr, kv = _tables(x.device)
    rows = 32
    _gguf_quant_kernel[(triton.cdiv(nb, rows),)](
        kernel_view(flat), out, thr, kv, n, nb, KIND=KIND[fmt], TS=TYPE_SIZE[fmt], ROWS=rows,
        IN_BF16=flat.dtype == torch.bfloat16, enable_fp_fusion=False)
    return out


def _dequantize_triton(data: torch.Tensor, fmt: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype, device=data.device)
    nb = data.numel() // TYPE_SIZE[fmt]
    rows = 8 if fmt == "q4_k" else 32
    _gguf_dequant_kernel[(triton.cdiv(nb, rows),)](
        data.contiguous(), kernel_view(out), n, nb, KIND=KIND[fmt], TS=TYPE_SIZE[fmt], B=BLOCK[fmt], ROWS=rows,
        OUT_BF16=dtype == torch.bfloat16, enable_fp_fusion=False)
    return out


# ----------------------------------------------------------------------------- C++


@with_kernel_team(lambda x, *a, **k: x.numel())
def _quantize_cpp(x: torch.Tensor, fmt: str) -> torch.Tensor:
    thr, _ = _tables(x.device)
    return load_cpp_ext("quant_gguf").quantize(x.reshape(-1).contiguous(), KIND[fmt], thr)


@with_kernel_team(lambda data, fmt, n, *a, **k: n)
def _dequantize_cpp(data: torch.Tensor, fmt: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    return load_cpp_ext("quant_gguf").dequantize(data.contiguous(), KIND[fmt], n, dtype)


# ----------------------------------------------------------------------------- dispatch


def quantize_gguf(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize ``x`` (bf16/fp16/fp32, any shape, flattened) to flat uint8 blocks
    (``n_blocks * TYPE_SIZE[fmt]`` bytes). Backend: ``backend_for(x, cpp="quant_gguf")``."""
    check_format(fmt)
    backend = backend_for(x, cpp="quant_gguf")
    if backend == "triton":
        return _quantize_triton(x, fmt)
    if backend == "cpp":
        return _quantize_cpp(x, fmt)
    return quantize_gguf_reference(x, fmt)


def dequantize_gguf(data: torch.Tensor, fmt: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_gguf`: a flat ``dtype`` tensor of ``n`` elements."""
    check_format(fmt)
    if data.dtype != torch.uint8 or data.numel() != n_blocks(fmt, n) * TYPE_SIZE[fmt]:
        raise ValueError(f"{fmt}: data must be uint8 with {n_blocks(fmt, n) * TYPE_SIZE[fmt]} bytes for "
                         f"{n} elements, got {data.dtype} with {data.numel()}")
    backend = backend_for(data, cpp="quant_gguf")
    if backend == "triton":
        return _dequantize_triton(data, fmt, n, dtype)
    if backend == "cpp":
        return _dequantize_cpp(data, fmt, n, dtype)
    return dequantize_gguf_reference(data, fmt, n, dtype)


def fp16_scale_overflow(data: torch.Tensor, fmt: str) -> bool:
    """Whether a block's fp16 scale (or min) overflowed to inf (|w| too large for the format)."""
    if fmt == "mxfp4":
        return False
    b = data.view(-1, TYPE_SIZE[fmt])
    heads = [b[:, 0:2]] + ([b[:, 2:4]] if fmt in ("q4_1", "q5_1", "q4_k") else [])
    return any(bool((~torch.isfinite(_fp16_of(h))).any()) for h in heads)


__all__ = ["GGUF_FORMATS", "BLOCK", "TYPE_SIZE", "quantize_gguf", "dequantize_gguf", "quantize_gguf_reference",
           "dequantize_gguf_reference", "block_codes", "block_affine", "n_blocks"]

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

Implementations, equal bit for bit: the torch reference, Triton kernels
(:mod:`qru.kernels.quant_gguf_triton`; CUDA, or CPU under ``TRITON_INTERPRET=1``) and
``csrc/quant_gguf.cpp``. :func:`quantize_gguf` / :func:`dequantize_gguf` dispatch at call time
(``QRU_BACKEND``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from qru.kernels import quant_gguf_triton
from qru.kernels._backend import backend_for, load_cpp_ext

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


# ----------------------------------------------------------------------------- Triton (quant_gguf_triton)


def _quantize_triton(x: torch.Tensor, fmt: str) -> torch.Tensor:
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    nb = n_blocks(fmt, n)
    out = torch.empty(nb * TYPE_SIZE[fmt], dtype=torch.uint8, device=x.device)
    if fmt == "q4_k":
        quant_gguf_triton.quantize_q4_k(flat, out, n, nb)
    else:
        thr, kv = _tables(x.device)
        quant_gguf_triton.quantize_blocks(flat, out, thr, kv, n, nb, KIND[fmt], TYPE_SIZE[fmt])
    return out


def _dequantize_triton(data: torch.Tensor, fmt: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype, device=data.device)
    nb = data.numel() // TYPE_SIZE[fmt]
    quant_gguf_triton.dequantize_blocks(data.contiguous(), out, n, nb, KIND[fmt], TYPE_SIZE[fmt], BLOCK[fmt])
    return out


# ----------------------------------------------------------------------------- C++


def _quantize_cpp(x: torch.Tensor, fmt: str) -> torch.Tensor:
    thr, _ = _tables(x.device)
    return load_cpp_ext("quant_gguf").quantize(x.reshape(-1).contiguous(), KIND[fmt], thr)


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

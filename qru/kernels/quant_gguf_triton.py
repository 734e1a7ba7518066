"""Triton kernels of :mod:`qru.kernels.quant_gguf` (CUDA, or CPU under ``TRITON_INTERPRET=1``):
the 32-element block formats in one quantize kernel, ``q4_k`` in its own, and one dequantize
kernel for all. Bit-equal to the torch reference; ``quant_gguf`` allocates the outputs, passes
each format's layout (``KIND``, ``TYPE_SIZE``, ``BLOCK``) and its tables, and dispatches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qru.kernels._triton_io import jit, kernel_view, load_f32, store_f32

# Plain fp32 ops; the launches pass ``enable_fp_fusion=False`` so that no multiply feeds an add
# through an FMA (the results must round like ggml's reference C).
@jit
def _mul(a, b):
    return a * b


@jit
def _add(a, b):
    return a + b


@jit
def _sub(a, b):
    return a - b


@jit
def _load_fp16(ptr, mask):
    """fp32 of the little-endian fp16 at byte ``ptr`` (masked lanes: 0)."""
    h = tl.load(ptr, mask=mask, other=0).to(tl.int32) | (tl.load(ptr + 1, mask=mask, other=0).to(tl.int32) << 8)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@jit
def _fp16_lo_hi(v):
    """fp32 -> (low byte, high byte) of its fp16 (round to nearest even), as int32."""
    h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h & 255, h >> 8


# The 32-value block math, shared with fake_quant's kernel (as csrc/gguf_blocks.h is on CPU): the
# scales and integer codes of ROWS blocks ``x`` (ROWS, 32), ggml's reference arithmetic.
@jit
def _recip(d, ROWS: tl.constexpr):
    """1 / d, 0 where d is 0."""
    return tl.where(d == 0, 0.0, tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.where(d == 0, 1.0, d)))


@jit
def q8_0_codes(x, ROWS: tl.constexpr):
    """(d = amax / 127 before its fp16 rounding, codes round-half-away(x / d) in [-127, 127])."""
    d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full((ROWS,), 127.0, tl.float32))
    v = _mul(x, _recip(d, ROWS)[:, None])
    a = tl.abs(v)
    f = tl.math.floor(a)
    r = f + tl.math.floor(2.0 * (a - f))
    return d, tl.where(v < 0, -r, r).to(tl.int32)


@jit
def q_0_codes(x, col, HALF: tl.constexpr, TOP: tl.constexpr, ROWS: tl.constexpr):
    """q4_0 (HALF 8, TOP 15) / q5_0 (16, 31): (d = the first largest-|x| value / -HALF, codes in
    [0, TOP]; the value is d * (code - HALF))."""
    imax = tl.argmax(tl.abs(x), axis=1, tie_break_left=True)
    xbits = x.to(tl.int32, bitcast=True)
    mbits = tl.max(tl.where(col[None, :] == imax[:, None], xbits, -2147483648), axis=1)
    d = tl.math.div_rn(mbits.to(tl.float32, bitcast=True), tl.full((ROWS,), -HALF, tl.float32))
    v = _add(_mul(x, _recip(d, ROWS)[:, None]), HALF + 0.5)
    return d, tl.minimum(tl.maximum(v.to(tl.int32), 0), TOP)


@jit
def q_1_codes(x, TOP: tl.constexpr, ROWS: tl.constexpr):
    """q4_1 (TOP 15) / q5_1 (31): (d = (max - min) / TOP, min, codes in [0, TOP]; value d * code + min)."""
    mx = tl.max(x, axis=1)
    mn = tl.min(x, axis=1)
    d = tl.math.div_rn(mx - mn, tl.full((ROWS,), TOP * 1.0, tl.float32))
    v = _add(_mul(x - mn[:, None], _recip(d, ROWS)[:, None]), 0.5)
    return d, mn, tl.minimum(tl.maximum(v.to(tl.int32), 0), TOP)


@jit
def mxfp4_codes(x, thr_ptr, kv_ptr, ROWS: tl.constexpr):
    """(E8M0 exponent e, d = half its scale, codes 0..15 indexing the doubled value table ``kv``:
    the nearest to x / d, the first on a tie)."""
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
    return e, d, q


@jit
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
        d, q = q8_0_codes(x, ROWS)
        lo, hi = _fp16_lo_hi(d)
        tl.store(ob, lo.to(tl.uint8), mask=bok)
        tl.store(ob + 1, hi.to(tl.uint8), mask=bok)
        tl.store(ob[:, None] + 2 + col[None, :], (q & 255).to(tl.uint8), mask=bok[:, None])
    else:
        if KIND == 6:
            e, d, q = mxfp4_codes(x, thr_ptr, kv_ptr, ROWS)
            tl.store(ob, e.to(tl.uint8), mask=bok)
            qoff = 1
        elif KIND == 1 or KIND == 3:
            d, q = q_0_codes(x, col, 8.0 if KIND == 1 else 16.0, 15 if KIND == 1 else 31, ROWS)
            lo, hi = _fp16_lo_hi(d)
            tl.store(ob, lo.to(tl.uint8), mask=bok)
            tl.store(ob + 1, hi.to(tl.uint8), mask=bok)
            qoff = 2
        else:
            d, mn, q = q_1_codes(x, 15 if KIND == 2 else 31, ROWS)
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


@jit
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


@jit
def _nearest(v):
    """ggml's nearest_int as fp32 (round half to even, |v| <= 2**22)."""
    return (v + 12582912.0) - 12582912.0


@jit
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



def quantize_blocks(flat: torch.Tensor, out: torch.Tensor, thr: torch.Tensor, kv: torch.Tensor, n: int, nb: int,
                    kind: int, type_size: int) -> None:
    """The 32-element formats (``kind`` as ``quant_gguf.KIND``): ``nb`` blocks of ``flat`` into ``out``."""
    rows = 32
    _gguf_quant_kernel[(triton.cdiv(nb, rows),)](
        kernel_view(flat), out, thr, kv, n, nb, KIND=kind, TS=type_size, ROWS=rows,
        IN_BF16=flat.dtype == torch.bfloat16, enable_fp_fusion=False)


Q4K_GPU_ROWS = 4  # q4_k super-blocks per program on the GPU


def quantize_q4_k(flat: torch.Tensor, out: torch.Tensor, n: int, nb: int, rows: int | None = None) -> None:
    """``q4_k``: ``nb`` super-blocks of ``flat`` into ``out``, ``rows`` super-blocks per program
    (default: :data:`Q4K_GPU_ROWS` on CUDA)."""
    # the interpreter's cost is per program (sequential loops), so it gets few wide ones
    rows = rows or (Q4K_GPU_ROWS if flat.is_cuda else min(64, triton.next_power_of_2(nb)))
    _q4k_quant_kernel[(triton.cdiv(nb, rows),)](kernel_view(flat), out, n, nb, ROWS=rows,
                                                IN_BF16=flat.dtype == torch.bfloat16, enable_fp_fusion=False)


def dequantize_blocks(data: torch.Tensor, out: torch.Tensor, n: int, nb: int, kind: int, type_size: int,
                      block: int) -> None:
    """``nb`` blocks of ``data`` (``kind`` as ``quant_gguf.KIND``) into the first ``n`` values of ``out``."""
    rows = 8 if kind == 5 else 32  # q4_k: 256-element blocks
    _gguf_dequant_kernel[(triton.cdiv(nb, rows),)](
        data, kernel_view(out), n, nb, KIND=kind, TS=type_size, B=block, ROWS=rows,
        OUT_BF16=out.dtype == torch.bfloat16, enable_fp_fusion=False)

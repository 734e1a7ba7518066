"""A line-by-line numpy-float32 transcription of ggml-quants.c's ``quantize_row_q4_K_ref`` and
``make_qkx2_quants`` (llama.cpp): the test oracle for qru's q4_k quantizers. Scalar loops, every
operation an explicit fp32 op in source order; slow, for a few super-blocks only."""
import numpy as np

f32 = np.float32


def nearest_int(fval):
    val = f32(f32(fval) + f32(12582912.0))
    i = int(np.array([val], dtype=np.float32).view(np.int32)[0])
    return (i & 0x007FFFFF) - 0x00400000


def make_qkx2_quants(n, nmax, x, weights, rmin, rdelta, nstep):
    L = [0] * n
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w = f32(sum_w + w)
        sum_x = f32(sum_x + f32(w * x[i]))
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        return f32(0), f32(-mn), [0] * n
    iscale = f32(f32(nmax) / f32(mx - mn))
    scale = f32(f32(1) / iscale)
    best_error = f32(0)
    for i in range(n):
        l = nearest_int(f32(iscale * f32(x[i] - mn)))
        L[i] = max(0, min(nmax, l))
        diff = f32(f32(f32(scale * f32(L[i])) + mn) - x[i])
        diff = f32(diff * diff)
        best_error = f32(best_error + f32(weights[i] * diff))
    for step in range(nstep + 1):
        iscale = f32(f32(f32(rmin + f32(rdelta * f32(step))) + f32(nmax)) / f32(mx - mn))
        sum_l = sum_l2 = sum_xl = f32(0)
        Laux = [0] * n
        for i in range(n):
            l = nearest_int(f32(iscale * f32(x[i] - mn)))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            sum_l = f32(sum_l + f32(w * f32(l)))
            sum_l2 = f32(sum_l2 + f32(f32(w * f32(l)) * f32(l)))
            sum_xl = f32(sum_xl + f32(f32(w * f32(l)) * x[i]))
        D = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
        if D > 0:
            this_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / D)
            this_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = f32(0)
                this_scale = f32(sum_xl / sum_l2)
            cur_error = f32(0)
            for i in range(n):
                diff = f32(f32(f32(this_scale * f32(Laux[i])) + this_min) - x[i])
                diff = f32(diff * diff)
                cur_error = f32(cur_error + f32(weights[i] * diff))
            if cur_error < best_error:
                L = list(Laux)
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, f32(-mn), L


def quantize_q4_k(x) -> bytes:
    """fp32 values (a multiple of 256) -> the bytes of block_q4_K structs."""
    x = [f32(v) for v in np.asarray(x, dtype=np.float32).reshape(-1)]
    out = bytearray()
    for b in range(len(x) // 256):
        xs = x[256 * b: 256 * (b + 1)]
        L = [0] * 256
        scales, mins = [f32(0)] * 8, [f32(0)] * 8
        max_scale = max_min = f32(0)
        for j in range(8):
            sum_x2 = f32(0)
            for l in range(32):
                sum_x2 = f32(sum_x2 + f32(xs[32 * j + l] * xs[32 * j + l]))
            av_x = f32(np.sqrt(f32(sum_x2 / f32(32))))
            weights = [f32(av_x + f32(abs(xs[32 * j + l]))) for l in range(32)]
            scales[j], mins[j], Lj = make_qkx2_quants(32, 15, xs[32 * j: 32 * j + 32], weights,
                                                      f32(-1.0), f32(0.1), 20)
            L[32 * j: 32 * j + 32] = Lj
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = f32(f32(63) / max_scale) if max_scale > 0 else f32(0)
        inv_min = f32(f32(63) / max_min) if max_min > 0 else f32(0)
        sc = [0] * 12
        ls_all, lm_all = [], []
        for j in range(8):
            ls = min(63, nearest_int(f32(inv_scale * scales[j])) & 255)
            lm = min(63, nearest_int(f32(inv_min * mins[j])) & 255)
            ls_all.append(ls)
            lm_all.append(lm)
            if j < 4:
                sc[j] = ls
                sc[j + 4] = lm
            else:
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                sc[j - 4] |= (ls >> 4) << 6
                sc[j] |= (lm >> 4) << 6
        d16 = np.float16(f32(max_scale / f32(63)))
        dm16 = np.float16(f32(max_min / f32(63)))
        for j in range(8):
            d = f32(f32(d16) * f32(ls_all[j]))
            if d == 0:
                continue
            dm = f32(f32(dm16) * f32(lm_all[j]))
            for ii in range(32):
                l = nearest_int(f32(f32(xs[32 * j + ii] + dm) / d))
                L[32 * j + ii] = max(0, min(15, l))
        qs = bytearray()
        for j in range(0, 256, 64):
            for l in range(32):
                qs.append(L[j + l] | (L[j + l + 32] << 4))
        out += np.array([d16, dm16], dtype=np.float16).tobytes() + bytes(sc) + bytes(qs)
    return bytes(out)

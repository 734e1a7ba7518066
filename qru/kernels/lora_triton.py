"""The Triton path of :func:`qru.kernels.lora.lora_linear`: the kernels (base GEMM with the low-rank
add, shrink, outer product), their autotune configurations, the launchers and the two autograd
Functions over them (:class:`LoRALinearTritonFn`, :class:`BaseTritonFn`). Sampled dropout is hashed
in place by :func:`qru.kernels.hash_dropout.hash_dropped`; the NF4 base is decoded tile by tile.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qru.kernels.hash_dropout import hash_dropped

@triton.jit
def _dropped_tile(m_ptr, smm, smn, seed_ptr, thr, rows, cols, valid, HAS_MASK: tl.constexpr,
                  HASH_DROP: tl.constexpr):
    """Drop-mask tile at (rows, cols): from a stored mask (``HAS_MASK``) or the hash (``HASH_DROP``)."""
    if HASH_DROP:
        return hash_dropped(rows, cols, seed_ptr, thr)
    else:
        return tl.load(m_ptr + rows[:, None] * smm + cols[None, :] * smn, mask=valid, other=0) != 0


@triton.jit
def _nf4_decode(data_ptr, absmax_ptr, code_ptr, flat, valid, NF4_BLOCK: tl.constexpr):
    """fp32 values of the NF4 elements at flat indices ``flat`` (int64), zero where not ``valid``."""
    byte = tl.load(data_ptr + flat // 2, mask=valid, other=0).to(tl.int32)
    nib = tl.where((flat % 2) == 0, byte >> 4, byte & 15)
    val = tl.load(code_ptr + nib, mask=valid, other=0.0)
    amax = tl.load(absmax_ptr + flat // NF4_BLOCK, mask=valid, other=0.0)
    return val * amax


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, wd_ptr, wa_ptr, code_ptr, u_ptr, v_ptr, m_ptr, seed_ptr, b_ptr, c_ptr,
    M, N, K, R, M_BUCKET,
    sxm, sxk, swk, swn, fk, fn, sum_, sur, svr, svn, smm, smn, scm, scn,
    scale, thr,
    NF4: tl.constexpr, NF4_BLOCK: tl.constexpr, HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr,
    HASH_DROP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """C[M,N] = X[M,K]·Wop[K,N] + scale·(U[M,R]·V[R,N]) (zero where dropped) + bias[N].

    ``Wop[k, n]`` lives at ``w + k·swk + n·swn`` (dense) or at flat NF4 index ``k·fk + n·fn``.
    The low-rank product is added to the fp32 accumulator before the one store of C. The
    drop-mask is stored (``HAS_MASK``) or hashed in place from the seed (``HASH_DROP``).
    ``M_BUCKET`` is an autotune key only.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    in_m = rm < M
    in_n = rn < N
    cdt = tl.float32 if UPCAST else x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        in_k = kk < K
        a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=in_m[:, None] & in_k[None, :], other=0.0)
        wmask = in_k[:, None] & in_n[None, :]
        if NF4:
            w = _nf4_decode(wd_ptr, wa_ptr, code_ptr, kk[:, None] * fk + rn[None, :] * fn, wmask, NF4_BLOCK)
        else:
            w = tl.load(w_ptr + kk[:, None] * swk + rn[None, :] * swn, mask=wmask, other=0.0)
        acc = tl.dot(a.to(cdt), w.to(cdt), acc, input_precision=DOT_PREC)

    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        in_r = rr < R
        u = tl.load(u_ptr + rm[:, None] * sum_ + rr[None, :] * sur, mask=in_m[:, None] & in_r[None, :], other=0.0)
        v = tl.load(v_ptr + rr[:, None] * svr + rn[None, :] * svn, mask=in_r[:, None] & in_n[None, :], other=0.0)
        low = tl.dot(u.to(cdt), v.to(cdt), input_precision=DOT_PREC) * scale
        if HAS_MASK or HASH_DROP:
            dropped = _dropped_tile(m_ptr, smm, smn, seed_ptr, thr, rm, rn, in_m[:, None] & in_n[None, :],
                                    HAS_MASK, HASH_DROP)
            low = tl.where(dropped, 0.0, low)
        acc += low
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _lora_shrink_kernel(
    x_ptr, v_ptr, m_ptr, seed_ptr, o_ptr,
    M, K, R, K_PER_SPLIT, M_BUCKET,
    sxm, sxk, svk, svr, smm, smk, sos, som, sor,
    alpha, thr,
    HAS_MASK: tl.constexpr, HASH_DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """O[split, M, R] = alpha · (X[M, Kslice], zero where dropped) · V[Kslice, R], fp32; split-K on axis 1."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    in_m = rm < M
    in_r = rr < R
    cdt = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    k_lo = pid_s * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        kk = k_lo + k0 + rk
        in_k = (kk < K) & (k0 + rk < K_PER_SPLIT)
        xm = in_m[:, None] & in_k[None, :]
        a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=xm, other=0.0)
        if HAS_MASK or HASH_DROP:
            dropped = _dropped_tile(m_ptr, smm, smk, seed_ptr, thr, rm, kk, xm, HAS_MASK, HASH_DROP)
            a = tl.where(dropped, 0.0, a)
        v = tl.load(v_ptr + kk[:, None] * svk + rr[None, :] * svr, mask=in_k[:, None] & in_r[None, :], other=0.0)
        acc = tl.dot(a.to(cdt), v.to(cdt), acc, input_precision=DOT_PREC)
    tl.store(o_ptr + pid_s * sos + rm[:, None] * som + rr[None, :] * sor, acc * alpha,
             mask=in_m[:, None] & in_r[None, :])


@triton.jit
def _lora_outer_kernel(
    l_ptr, r_ptr, m_ptr, seed_ptr, o_ptr,
    M, P, Q, M_PER_SPLIT, M_BUCKET,
    slm, slp, srm, srq, smm, smq, sos, sop, soq,
    alpha, thr,
    HAS_MASK: tl.constexpr, HASH_DROP: tl.constexpr, COMPUTE_FROM_L: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """O[split, P, Q] = alpha · Σ_m L[m, P] · (R[m, Q], zero where dropped), fp32; token split on axis 2."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    rp = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    rq = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    rb = tl.arange(0, BLOCK_M).to(tl.int64)
    in_p = rp < P
    in_q = rq < Q
    if UPCAST:
        cdt = tl.float32
    elif COMPUTE_FROM_L:
        cdt = l_ptr.dtype.element_ty
    else:
        cdt = r_ptr.dtype.element_ty
    m_lo = pid_s * M_PER_SPLIT
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, M_PER_SPLIT, BLOCK_M):
        mm = m_lo + m0 + rb
        in_t = (mm < M) & (m0 + rb < M_PER_SPLIT)
        lt = tl.load(l_ptr + mm[None, :] * slm + rp[:, None] * slp, mask=in_p[:, None] & in_t[None, :], other=0.0)
        rmask = in_t[:, None] & in_q[None, :]
        r = tl.load(r_ptr + mm[:, None] * srm + rq[None, :] * srq, mask=rmask, other=0.0)
        if HAS_MASK or HASH_DROP:
            dropped = _dropped_tile(m_ptr, smm, smq, seed_ptr, thr, mm, rq, rmask, HAS_MASK, HASH_DROP)
            r = tl.where(dropped, 0.0, r)
        acc = tl.dot(lt.to(cdt), r.to(cdt), acc, input_precision=DOT_PREC)
    tl.store(o_ptr + pid_s * sos + rp[:, None] * sop + rq[None, :] * soq, acc * alpha,
             mask=in_p[:, None] & in_q[None, :])


# Autotune configurations (CUDA). Every entry must also run under the interpreter:
# tests/test_lora_triton.py launches each one explicitly through the launchers' ``config``.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=4),
]
SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
]
OUTER_CONFIGS = [
    triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
]
_KEY = ["M_BUCKET", "N", "K", "R", "NF4", "HAS_LORA", "HAS_MASK", "HASH_DROP"]
_gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=_KEY)(_lora_gemm_kernel)
_shrink_tuned = triton.autotune(configs=SHRINK_CONFIGS, key=["M_BUCKET", "K", "R", "HAS_MASK", "HASH_DROP"])(
    _lora_shrink_kernel)
_outer_tuned = triton.autotune(configs=OUTER_CONFIGS, key=["M_BUCKET", "P", "Q", "HAS_MASK", "HASH_DROP"])(
    _lora_outer_kernel)
# Granularity of the split-K / split-token slices (independent of the tile, so that the fp32
# workspace has one shape for every configuration).
_SPLIT_STEP = 128


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
# Tile sizes under the interpreter: small, so test shapes span several (partial) tiles,
# and a split of 2 so the split reductions are exercised too.
INTERPRET_BLOCK = 16
INTERPRET_SPLIT = 2
_INTERPRET_META = {
    "gemm": dict(BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK, BLOCK_K=INTERPRET_BLOCK, GROUP_M=2,
                 num_warps=1, num_stages=1),
    "shrink": dict(BLOCK_M=INTERPRET_BLOCK, BLOCK_K=INTERPRET_BLOCK, num_warps=1),
    "outer": dict(BLOCK_M=INTERPRET_BLOCK, num_warps=1),
}


def _launch(name, kernel, tuned, grid, args, meta, config, on_cuda):
    """Launch ``kernel``: autotuned on CUDA (``config`` None), else with ``config`` (a
    :class:`triton.Config`, as tests do for each entry of the lists) or the interpreter tiles."""
    if config is None and on_cuda:
        tuned[grid](*args, **meta)
        return
    if config is None:
        kw = dict(_INTERPRET_META[name])
    else:
        kw = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    kernel[grid(kw)](*args, **meta, **kw)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def _dot_prec(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 products follow torch's ``allow_tf32``; half types use Triton's default (the flag
    only matters for fp32); the interpreter always computes exactly."""
    if device.type != "cuda":
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """The CPU interpreter's ``tl.dot`` mishandles bf16: feed it the (exact) fp32 upcast."""
    return dtype == torch.bfloat16 and device.type != "cuda"


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass
class _Drop:
    """The dropout of one call: a stored bool drop-mask (a given ``dropout_mask``), or the hash
    seed (0-dim int64 tensor on the device) and threshold, the mask recomputed in the kernels."""
    mask: torch.Tensor | None = None
    seed: torch.Tensor | None = None
    thr: int = 0

    def args(self, dummy):
        """(mask_u8, seed, smm, smn, thr, HAS_MASK, HASH_DROP) for a kernel launch."""
        m = self.mask.view(torch.uint8) if self.mask is not None else None
        return (m if m is not None else dummy, self.seed.reshape(1) if self.seed is not None else dummy,
                m.stride(0) if m is not None else 0, m.stride(1) if m is not None else 0, int(self.thr),
                m is not None, self.seed is not None)


_NO_DROP = _Drop()


def _gemm(x, w, nf4, w_kn, u, v_rn, drop, bias, scale, out, config=None):
    """out[M,N] = x[M,K]·Wop[K,N] + scale·u·v (zero where dropped) + bias. ``w_kn`` = (swk, swn, fk, fn)."""
    M, K = x.shape
    N = out.shape[1]
    R = u.shape[1] if u is not None else 0
    dt = x.dtype
    swk, swn, fk, fn = w_kn
    dummy = out
    mk, sd, smm, smn, thr, has_mask, hash_drop = drop.args(dummy)
    args = (x, w if w is not None else dummy,
            nf4.data if nf4 is not None else dummy, nf4.absmax if nf4 is not None else dummy,
            nf4.code if nf4 is not None else dummy,
            u if u is not None else dummy, v_rn[0] if v_rn is not None else dummy, mk, sd,
            bias if bias is not None else dummy, out,
            M, N, K, R, _m_bucket(M),
            x.stride(0), x.stride(1), swk, swn, fk, fn,
            u.stride(0) if u is not None else 0, u.stride(1) if u is not None else 0,
            v_rn[1] if v_rn is not None else 0, v_rn[2] if v_rn is not None else 0,
            smm, smn, out.stride(0), out.stride(1), float(scale), thr)
    meta = dict(NF4=nf4 is not None, NF4_BLOCK=nf4.block_size if nf4 is not None else 1,
                HAS_LORA=u is not None, HAS_MASK=has_mask, HASH_DROP=hash_drop, HAS_BIAS=bias is not None,
                BLOCK_R=_block_r(R), DOT_PREC=_dot_prec(dt, x.device), UPCAST=_upcast(dt, x.device))
    grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)  # noqa: E731
    _launch("gemm", _lora_gemm_kernel, _gemm_tuned, grid, args, meta, config, x.is_cuda)
    return out


def _split(n: int, tiles: int, device, interpret_split: int) -> tuple[int, int]:
    """(split, per): ``n`` cut into ``split`` slices of ``per`` (a multiple of ``_SPLIT_STEP``)
    so that about two programs per SM run; under the interpreter ``interpret_split`` slices."""
    if device.type != "cuda":
        split = min(interpret_split, triton.cdiv(n, INTERPRET_BLOCK))
        step = INTERPRET_BLOCK
    else:
        split = max(1, min(triton.cdiv(n, 4 * _SPLIT_STEP), 2 * _sm_count(device) // max(1, tiles)))
        step = _SPLIT_STEP
    per = triton.cdiv(triton.cdiv(n, split), step) * step
    return triton.cdiv(n, per), per


def _shrink(x, v, v_kr, drop, alpha, config=None):
    """fp32 (M, R) = alpha·(x, zero where dropped)·Vop with ``Vop[k, r]`` at ``v + k·v_kr[0] + r·v_kr[1]``."""
    M, K = x.shape
    R = v_kr[2]
    split, k_per = _split(K, triton.cdiv(M, 64), x.device, INTERPRET_SPLIT)
    ws = torch.empty((split, M, R), device=x.device, dtype=torch.float32)
    mk, sd, smm, smk, thr, has_mask, hash_drop = drop.args(x)
    args = (x, v, mk, sd, ws, M, K, R, k_per, _m_bucket(M),
            x.stride(0), x.stride(1), v_kr[0], v_kr[1], smm, smk,
            ws.stride(0), ws.stride(1), ws.stride(2), float(alpha), thr)
    meta = dict(HAS_MASK=has_mask, HASH_DROP=hash_drop, BLOCK_R=_block_r(R),
                DOT_PREC=_dot_prec(x.dtype, x.device), UPCAST=_upcast(x.dtype, x.device))
    grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]), split)  # noqa: E731
    _launch("shrink", _lora_shrink_kernel, _shrink_tuned, grid, args, meta, config, x.is_cuda)
    return ws[0] if split == 1 else ws.sum(0)


def _outer(lhs, rhs, drop, alpha, compute_from_l, out_dtype, config=None):
    """(P, Q) = alpha·lhsᵀ·(rhs, zero where dropped), reducing over the M rows both share."""
    M, P = lhs.shape
    Q = rhs.shape[1]
    cdt = lhs.dtype if compute_from_l else rhs.dtype
    if lhs.is_cuda:
        bp = _block_r(P) if P <= 128 else 128
        bq = _block_r(Q) if Q <= 128 else 128
    else:
        bp = bq = INTERPRET_BLOCK
    tiles = triton.cdiv(P, bp) * triton.cdiv(Q, bq)
    split, m_per = _split(M, tiles, lhs.device, INTERPRET_SPLIT)
    ws = torch.empty((split, P, Q), device=lhs.device, dtype=torch.float32)
    mk, sd, smm, smq, thr, has_mask, hash_drop = drop.args(rhs)
    args = (lhs, rhs, mk, sd, ws, M, P, Q, m_per, _m_bucket(M),
            lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), smm, smq,
            ws.stride(0), ws.stride(1), ws.stride(2), float(alpha), thr)
    meta = dict(HAS_MASK=has_mask, HASH_DROP=hash_drop, COMPUTE_FROM_L=compute_from_l, BLOCK_P=bp, BLOCK_Q=bq,
                DOT_PREC=_dot_prec(cdt, lhs.device), UPCAST=_upcast(cdt, lhs.device))
    grid = lambda c: (triton.cdiv(P, bp), triton.cdiv(Q, bq), split)  # noqa: E731
    _launch("outer", _lora_outer_kernel, _outer_tuned, grid, args, meta, config, lhs.is_cuda)
    res = ws[0] if split == 1 else ws.sum(0)
    return res.to(out_dtype)


def _w_strides(weight, nf4, transposed: bool):
    """(swk, swn, fk, fn) for Wop = Wᵀ (forward, ``transposed``) or W (backward)."""
    if nf4 is not None:
        n_in = nf4.shape[1]
        return (0, 0, 1, n_in) if transposed else (0, 0, n_in, 1)
    s0, s1 = weight.stride()
    return (s1, s0, 0, 0) if transposed else (s0, s1, 0, 0)


class LoRALinearTritonFn(torch.autograd.Function):
    """Fused LoRA linear on 2-D ``x`` (M, in) with Triton kernels.

    Forward (``x̃ = k·(m⊙x)``, ``m`` the keep-mask, ``k`` its rescale)::

        u = x̃ Aᵀ                   shrink kernel, fp32 (M, r), split-K
        y = x Wᵀ + b + s·u Bᵀ       GEMM kernel: the expand is added to the accumulator tile

    Backward, ``G = dL/dy``. Since ``y`` depends on ``A, B`` only through ``s·u Bᵀ``::

        ∂L/∂u = s·G B = s·g          g = G B by the shrink kernel (fp32, reused twice)
        dB = s·Gᵀ u                  outer kernel, reduce over tokens
        dA = (s·g)ᵀ x̃ = s·k·gᵀ(m⊙x)  outer kernel, the mask applied on load
        dX = G W + k·m⊙(s·g A)       GEMM kernel with Wop = W and the masked expand
        db = Σ_rows G;               W is frozen: no dW.

    Sampled dropout (``seed``/``thr``): each kernel that needs the mask hashes it in place from
    the seed (:func:`hash_dropped`); no mask is stored. A given mask comes as the bool ``drop``.
    Only ``x``, that mask if given, the seed and the small ``u`` are saved.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, drop, keep, nf4, seed=None, thr=0):
        M, _ = x.shape
        N = B.shape[0]
        dr = _Drop(drop, seed if drop is None and thr else None, thr if drop is None else 0)
        # V[k, r] = A[r, k]
        u = _shrink(x, A, (A.stride(1), A.stride(0), A.shape[0]), dr, keep)
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
        _gemm(x, weight, nf4, _w_strides(weight, nf4, True), u, (B, B.stride(1), B.stride(0)),
              _NO_DROP, bias, scale, y)
        ctx.save_for_backward(x, drop, dr.seed, u, weight, A, B)
        ctx.scale, ctx.keep, ctx.nf4, ctx.thr = scale, keep, nf4, dr.thr
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, drop, seed, u, weight, A, B = ctx.saved_tensors
        s, keep, nf4 = ctx.scale, ctx.keep, ctx.nf4
        dr = _Drop(drop, seed, ctx.thr)
        gy = gy.contiguous()
        g = _shrink(gy, B, (B.stride(0), B.stride(1), B.shape[1]), _NO_DROP, 1.0)
        dx = dA = dB = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _gemm(gy, weight, nf4, _w_strides(weight, nf4, False), g, (A, A.stride(0), A.stride(1)),
                  dr, None, s * keep, dx)
        if ctx.needs_input_grad[3]:
            dA = _outer(g, x, dr, s * keep, False, A.dtype)
        if ctx.needs_input_grad[4]:
            dB = _outer(gy, u, _NO_DROP, s, True, B.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.sum(0)
        return dx, None, db, dA, dB, None, None, None, None, None, None


class BaseTritonFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` with the frozen (dense or NF4) W; ``dX = G W``, ``db = Σ_rows G``."""

    @staticmethod
    def forward(ctx, x, weight, bias, nf4):
        y = torch.empty((x.shape[0], nf4.shape[0] if nf4 is not None else weight.shape[0]),
                        device=x.device, dtype=x.dtype)
        _gemm(x, weight, nf4, _w_strides(weight, nf4, True), None, None, _NO_DROP, bias, 0.0, y)
        ctx.save_for_backward(weight)
        ctx.nf4, ctx.has_bias = nf4, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        gy = gy.contiguous()
        dx = db = None
        if ctx.needs_input_grad[0]:
            n_in = ctx.nf4.shape[1] if ctx.nf4 is not None else weight.shape[1]
            dx = torch.empty((gy.shape[0], n_in), device=gy.device, dtype=gy.dtype)
            _gemm(gy, weight, ctx.nf4, _w_strides(weight, ctx.nf4, False), None, None, _NO_DROP, None, 0.0, dx)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.sum(0)
        return dx, None, db, None

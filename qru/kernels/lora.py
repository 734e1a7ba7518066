"""Fused LoRA linear: ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` with a frozen base ``W``.

Shapes: ``x`` (..., in), ``W`` (out, in), ``A`` (r, in), ``B`` (out, r), ``s`` the scale
(alpha/r, or alpha/sqrt(r) for rsLoRA). Dropout acts on ``x`` on the LoRA path only, as in
peft; its mask is counter-based (one 64-bit seed per call from the generator, then a hash of
row and column, see :func:`_hash_drop_reference`), so the C++ and Triton kernels recompute it
where needed instead of storing it. ``W`` may be dense or NF4-packed (:class:`NF4Weight`, QLoRA
style); it never gets a gradient. Under ``torch.autocast`` the inputs are cast to the
autocast dtype first, as for ``F.linear``.

One public entry, :func:`lora_linear`, picks the backend at call time:

* ``"triton"`` (CUDA, or ``QRU_BACKEND=triton`` with ``TRITON_INTERPRET=1``): a shrink kernel
  computes ``u = drop(x) Aᵀ`` (M × r, fp32); the base GEMM kernel adds ``s·u Bᵀ`` to its
  accumulator tile before the single store of ``y``. The backward reuses the two kernels for
  ``g = dY B`` and ``dX = dY W + s·(g A)⊙mask``, and an outer-product kernel reduces over
  tokens for ``dA`` and ``dB``. The NF4 base is decoded tile by tile inside the GEMM. Sampled
  dropout is hashed inside each kernel that needs it from the seed (no mask in memory). Tiles
  are autotuned on CUDA over :data:`GEMM_CONFIGS`, :data:`SHRINK_CONFIGS`, :data:`OUTER_CONFIGS`.
* ``"cpp"`` (CPU, fp32; the default when ``csrc/lora.cpp`` builds): with dropout, the three
  rank-r products that see the mask in C++ (AVX2/FMA micro-tiles, OpenMP), the mask applied as
  x is read and as dX is stored, so neither a dropped-out copy of x nor the mask is kept; the
  other GEMMs stay with torch. Without dropout, and for other dtypes, the torch path below.
* ``"torch"`` (CPU fallback, and bf16/fp16 on CPU): the same math as a custom autograd Function
  over ``addmm`` with ``beta``/``out`` accumulation, never materialising ``W + s·B A``.

On CPU both paths run the two big frozen-base GEMMs (``x Wᵀ``, ``dY W``) through
:func:`qru.kernels.dense.dense_linear` (fp32: oneDNN with a fused add, about 2x MKL's sgemm
on the AVX-512 AMD development VM; torch's ``addmm`` otherwise).

:func:`lora_linear_reference` is the plain-autograd oracle the tests compare against.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qru.kernels._backend import backend_for, forced_backend, load_cpp_ext
from qru.kernels.dense import dense_linear
from qru.kernels._triton_io import jit

# Dropout draws 16-bit uniforms: the drop probability is rounded to a multiple of 1/65536.
_DROP_LEVELS = 65536


# ----------------------------------------------------------------------------------------
# NF4 base weight
# ----------------------------------------------------------------------------------------
@dataclass
class NF4Weight:
    """A frozen (out, in) weight in qru's NF4 format.

    The row-major flattened weight is cut into ``block_size`` consecutive elements, each
    with an fp32 absmax; codes are 4-bit, two per byte, the even element in the high
    nibble; ``value = code[c] * absmax[block]``. ``code`` (16 fp32 values) defaults to
    ``qru.kernels.quant4.NF4_CODE``.
    """
    data: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    block_size: int = 64
    code: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 2:
            raise ValueError(f"NF4Weight.shape must be (out, in), got {self.shape}")
        n = self.shape[0] * self.shape[1]
        if self.data.dtype != torch.uint8 or self.data.numel() != (n + 1) // 2:
            raise ValueError(f"NF4Weight.data must hold {(n + 1) // 2} uint8 bytes for shape {self.shape}, "
                             f"got {self.data.numel()} of {self.data.dtype}")
        nblocks = -(-n // self.block_size)
        if self.absmax.numel() != nblocks:
            raise ValueError(f"NF4Weight.absmax must hold {nblocks} values (block_size {self.block_size}), "
                             f"got {self.absmax.numel()}")
        self.data = self.data.reshape(-1)
        self.absmax = self.absmax.reshape(-1).float()
        if self.code is None:
            self.code = _default_nf4_code()
        self.code = self.code.reshape(-1).float().to(self.data.device)
        if self.code.numel() != 16:
            raise ValueError(f"NF4Weight.code must hold 16 values, got {self.code.numel()}")

    @classmethod
    def from_qtensor(cls, q) -> "NF4Weight":
        """Wrap a QTensor-like: ``data``, ``absmax`` (a tensor, or a method as on
        ``qru.quant.formats.QTensor``, which also undoes nested absmax), ``shape``, and
        optional ``block_size``/``code``/``fmt`` (must be ``"nf4"``)."""
        if isinstance(q, cls):
            return q
        fmt = getattr(q, "fmt", "nf4")
        if fmt != "nf4":
            raise TypeError(f"NF4 base weight: {type(q).__name__} has fmt={fmt!r}, expected 'nf4'")
        for name in ("data", "absmax", "shape"):
            if not hasattr(q, name):
                raise TypeError(f"NF4 base weight: {type(q).__name__} has no attribute {name!r}")
        absmax = q.absmax() if callable(q.absmax) else q.absmax
        return cls(q.data, absmax, tuple(q.shape), int(getattr(q, "block_size", 64)), getattr(q, "code", None))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "NF4Weight":
        return NF4Weight(self.data.to(device), self.absmax.to(device), self.shape, self.block_size,
                         self.code.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nf4_dequantize_reference(self, dtype)


def _default_nf4_code() -> torch.Tensor:
    try:
        from qru.kernels.quant4 import NF4_CODE
    except ImportError as exc:
        raise ImportError("NF4Weight needs a codebook: pass code=..., or provide qru.kernels.quant4.NF4_CODE") from exc
    return torch.as_tensor(NF4_CODE, dtype=torch.float32)


def nf4_dequantize_reference(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode the whole (out, in) matrix: ``code[nibble] * absmax[block]`` in fp32, then cast."""
    n = w.shape[0] * w.shape[1]
    b = w.data.to(torch.int64)
    idx = torch.stack((b >> 4, b & 15), dim=1).reshape(-1)[:n]
    blocks = torch.arange(n, device=w.data.device) // w.block_size
    return (w.code[idx] * w.absmax[blocks]).reshape(w.shape).to(dtype)


# ----------------------------------------------------------------------------------------
# Dropout mask and the reference
# ----------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32_(t: torch.Tensor, c: int, tmp: torch.Tensor) -> torch.Tensor:
    """``t ← t·c mod 2³²`` in place, for int64 ``t`` in [0, 2³²): in 16-bit halves of ``c`` so
    no product overflows int64."""
    torch.mul(t, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return t.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_M32)


def _lowbias32_(t: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """C. Wellons' lowbias32 integer hash, in place on uint32 values held in int64."""
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        t.bitwise_xor_(torch.bitwise_right_shift(t, shift, out=tmp))
        _mul32_(t, mul, tmp)
    return t.bitwise_xor_(torch.bitwise_right_shift(t, 16, out=tmp))


def _hash_drop_reference(rows: int, cols: int, seed: torch.Tensor, thr: int) -> torch.Tensor:
    """The counter-based drop-mask (bool, rows × cols) in torch ops: with ``k0``/``k1`` the low and
    high 32 bits of ``seed`` (int64, 0-dim, on the mask's device)::

        rowh[m] = h(m ^ k1),  colh[n] = h(n ^ k0),  dropped = h(colh[n] + rowh[m] mod 2³²) >> 16 < thr

    ``h`` = lowbias32, uint32 arithmetic. csrc/lora.cpp computes the same bits on the fly
    (forward and backward). Here in int64 tensors, in place, a few rows at a time."""
    dev = seed.device
    rowh = torch.arange(rows, device=dev).bitwise_xor_((seed >> 32) & _M32)
    colh = torch.arange(cols, device=dev).bitwise_xor_(seed & _M32)
    _lowbias32_(rowh, torch.empty_like(rowh))
    _lowbias32_(colh, torch.empty_like(colh))
    out = torch.empty((rows, cols), dtype=torch.bool, device=dev)
    step = max(1, (1 << 18) // max(cols, 1))
    t = torch.empty((min(step, rows), cols), dtype=torch.int64, device=dev)
    tmp = torch.empty_like(t)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        tt = torch.add(rowh[r0:r0 + n, None], colh[None, :], out=t[:n]).bitwise_and_(_M32)
        _lowbias32_(tt, tmp[:n]).bitwise_right_shift_(16)
        torch.lt(tt, thr, out=out[r0:r0 + n])
    return out


def _drop_params(p: float, device, generator: torch.Generator | None = None):
    """``(seed, thr, keep)`` for one dropout draw: ``seed`` a 0-dim int64 tensor on ``device``
    (one 64-bit draw from ``generator``), ``thr = round(p·65536)`` (0: no dropout) and the keep
    rescale ``1/(1-p')``, ``p' = thr/65536``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    thr = int(round(p * _DROP_LEVELS))
    if thr == 0:
        return None, 0, 1.0
    seed = torch.empty((), dtype=torch.int64, device=device).random_(-(2 ** 63), None, generator=generator)
    return seed, thr, _DROP_LEVELS / (_DROP_LEVELS - thr)


def _hash_drop(rows: int, cols: int, seed: torch.Tensor, thr: int) -> torch.Tensor:
    """The drop-mask of :func:`_hash_drop_reference`, by the C++ kernel on CPU when it is built, by
    the Triton hash on CUDA."""
    if forced_backend() != "torch":
        if seed.device.type == "cuda":
            return hash_drop_triton(rows, cols, seed, thr)
        if seed.device.type == "cpu":
            ext = load_cpp_ext("lora")
            if ext is not None:
                return ext.drop_mask(rows, cols, int(seed), thr)
    return _hash_drop_reference(rows, cols, seed, thr)


def _sample_drop(shape, p: float, device, generator: torch.Generator | None = None):
    """A drop-mask (bool, ``shape``, True = dropped) and the keep rescale ``1/(1-p')``.

    Counter-based: one 64-bit seed from ``generator``, then a hash of (row, column) per element
    (rows = the flattened leading dims), compared with ``p' = round(p·65536)/65536``."""
    seed, thr, keep = _drop_params(p, device, generator)
    if thr == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device), 1.0
    cols = shape[-1] if len(shape) else 1
    rows = math.prod(shape[:-1]) if len(shape) else 1
    return _hash_drop(rows, cols, seed, thr).view(shape), keep


def make_dropout_mask(shape, p: float, device, generator: torch.Generator | None = None):
    """The keep-mask (bool, ``shape``) and rescale that :func:`lora_linear` draws for the same
    ``generator`` state (for an x of that shape). ``p`` is rounded to a multiple of 1/65536."""
    dropped, keep = _sample_drop(shape, p, device, generator)
    return ~dropped, keep


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, *, dropout_mask=None,
                          keep_scale: float = 1.0, nf4: NF4Weight | None = None) -> torch.Tensor:
    """Plain autograd composition (the peft math), used as the oracle in tests."""
    W = nf4.dequantize(x.dtype) if nf4 is not None else weight
    y = F.linear(x, W, bias)
    if lora_A is None:
        return y
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype) * keep_scale
    return y + scale * F.linear(F.linear(xd, lora_A.to(x.dtype)), lora_B.to(x.dtype))


# ----------------------------------------------------------------------------------------
# CPU path: reference math in a custom autograd Function
# ----------------------------------------------------------------------------------------
def _dense_base(weight, nf4: NF4Weight | None, dtype):
    return nf4.dequantize(dtype) if nf4 is not None else weight


class LoRALinearTorchFn(torch.autograd.Function):
    """Fused LoRA linear on 2-D ``x`` (M, in) with torch ops.

    Forward, with ``m`` the keep-mask, ``k`` its rescale and ``x̃ = k·(m⊙x)``::

        u = x̃ Aᵀ                      (M, r)   computed once, saved
        y = b + (s·u) Bᵀ, then y += x Wᵀ  (the big GEMM accumulates into y: dense_linear's add)

    Backward, ``G = dL/dy``::

        g  = G B                       (M, r)   computed once, reused (scaled by s·k in place)
        dB = s·Gᵀ u                    (out, r)
        dA = s·gᵀ x̃ = (s·k·g)ᵀ (m⊙x)   (r, in)
        dX = G W + m ⊙ ((s·k·g) A)     (the thin product first, the big GEMM accumulates)
        db = Σ_rows G ;  no gradient for the frozen W.

    Saves ``x`` (or ``m⊙x`` and ``m`` under dropout), ``u`` and the weights: never ``x Wᵀ``
    nor a dropout copy of ``x`` beside ``x``. ``drop`` is the complement ``¬m`` (bool), so
    masking is a ``masked_fill`` with no float mask.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, drop, keep, nf4):
        dtype = x.dtype
        W = _dense_base(weight, nf4, dtype)
        Ac, Bc = A.to(dtype), B.to(dtype)
        xd = x if drop is None else x.masked_fill(drop, 0)
        u = torch.mm(xd, Ac.t())
        if keep != 1.0:
            u.mul_(keep)
        us = u * scale  # scale the thin (M, r) factor, never an (M, out) tensor
        y = torch.addmm(bias.to(dtype), us, Bc.t()) if bias is not None else torch.mm(us, Bc.t())
        y = dense_linear(x, W, add=y, accumulate=True)
        ctx.save_for_backward(xd, drop, u, weight, A, B)
        ctx.scale, ctx.keep, ctx.nf4 = scale, keep, nf4
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        xd, drop, u, weight, A, B = ctx.saved_tensors
        s, keep, nf4 = ctx.scale, ctx.keep, ctx.nf4
        gy = gy.contiguous()
        dtype = gy.dtype
        Ac, Bc = A.to(dtype), B.to(dtype)
        gs = torch.mm(gy, Bc)
        gs.mul_(s * keep)  # (M, r): the scales ride on the thin factor
        dx = dA = dB = db = None
        if ctx.needs_input_grad[0]:
            W = _dense_base(weight, nf4, dtype)
            dx = torch.mm(gs, Ac)
            if drop is not None:
                dx.masked_fill_(drop, 0)
            dx = dense_linear(gy, W.t(), add=dx, accumulate=True)
        if ctx.needs_input_grad[3]:
            dA = torch.mm(gs.t(), xd).to(A.dtype)
        if ctx.needs_input_grad[4]:
            dB = torch.mm(gy.t(), u)
            dB.mul_(s)
            dB = dB.to(B.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.sum(0)
        return dx, None, db, dA, dB, None, None, None, None


# ----------------------------------------------------------------------------------------
# CPU path: C++ thin products (csrc/lora.cpp) around torch's two big GEMMs
# ----------------------------------------------------------------------------------------
def _cpp_ok(x, weight, bias, A, B) -> bool:
    """The C++ kernels cover fp32 (x, base, bias, A, B); other dtypes take the torch path."""
    f32 = torch.float32
    return (x.dtype == f32 and (weight is None or weight.dtype == f32) and A.dtype == f32 and B.dtype == f32
            and (bias is None or bias.dtype == f32))


class LoRALinearCppFn(torch.autograd.Function):
    """Fused LoRA linear with dropout on 2-D fp32 ``x`` (M, in): the three rank-r products that
    touch the mask in C++ (mask applied as x is read / as dX is stored), the rest with torch.

    Forward, ``m`` the keep-mask (``drop = ¬m``), ``k`` its rescale, ``x̃ = k·(m⊙x)``::

        u = x̃ Aᵀ                    C++ rowdot: x masked row by row in cache, x̃ never in memory
        y = b + (s·u) Bᵀ, then y += x Wᵀ   (dense_linear with add: the big GEMM accumulates into y)

    Backward, ``G = dL/dy``. ``y`` depends on ``A, B`` only through ``s·u Bᵀ``, so with
    ``g = G B`` (M × r, computed once) ``∂L/∂u = s·g`` and::

        dB = s·Gᵀ u                 (torch mm; u saved from the forward)
        dA = (s·g)ᵀ ∂u/∂A = s·k·gᵀ(m⊙x)   C++ tallreduce over tokens, mask applied as x is read
        dX = G W + s·k·m⊙(g A)      C++ expand with the mask on store into a fresh dX, then dense_linear adds G W
        db = Σ_rows G;              W is frozen: no dW, and no GEMM for it.

    Saves ``x`` (the layer input, no dropout copy) and ``u`` (M × r). A sampled mask is the
    counter-based hash of (row, column) under ``seed``/``thr`` (see :func:`_hash_drop_reference`),
    recomputed by each kernel that needs it and never stored; a given ``dropout_mask`` comes as
    the bool ``drop``. Without dropout MKL's thin GEMMs are as fast as these kernels (faster
    for r ≥ 32), so that case takes :class:`LoRALinearTorchFn`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, drop, keep, nf4, seed, thr):
        ext = load_cpp_ext("lora")
        W = _dense_base(weight, nf4, x.dtype)
        Ac = A.contiguous()
        u = ext.rowdot(x, Ac, keep, drop, seed, thr)
        us = u * scale
        y = torch.addmm(bias, us, B.t()) if bias is not None else torch.mm(us, B.t())
        y = dense_linear(x, W, add=y, accumulate=True)
        ctx.save_for_backward(x, drop, u, weight, Ac, B)
        ctx.scale, ctx.keep, ctx.nf4, ctx.seed, ctx.thr = scale, keep, nf4, seed, thr
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, drop, u, weight, A, B = ctx.saved_tensors
        s, keep, nf4, seed, thr = ctx.scale, ctx.keep, ctx.nf4, ctx.seed, ctx.thr
        ext = load_cpp_ext("lora")
        gy = gy.contiguous()
        g = torch.mm(gy, B)
        dx = dA = dB = db = None
        if ctx.needs_input_grad[0]:
            dx = ext.expand(g, A, s * keep, None, drop, seed, thr)
            dx = dense_linear(gy, _dense_base(weight, nf4, gy.dtype).t(), add=dx, accumulate=True)
        if ctx.needs_input_grad[3]:
            dA = ext.tallreduce(g, x, s * keep, drop, seed, thr)
        if ctx.needs_input_grad[4]:
            dB = torch.mm(gy.t(), u)
            dB.mul_(s)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.sum(0)
        return dx, None, db, dA, dB, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
@jit
def _lowbias32(x):
    """lowbias32 on uint32 (wrapping products), as :func:`_lowbias32_` and csrc/lora.cpp."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@jit
def _hash_dropped(rows, cols, seed_ptr, thr):
    """The drop-mask tile (bool, rows × cols) of :func:`_hash_drop_reference` for int64 row and
    column indices: the 64-bit seed is read from ``seed_ptr`` (no host sync), nothing is stored."""
    s = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    k0 = s.to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    rowh = _lowbias32(rows.to(tl.uint32) ^ k1)
    colh = _lowbias32(cols.to(tl.uint32) ^ k0)
    h = _lowbias32(rowh[:, None] + colh[None, :])
    return (h >> 16).to(tl.int32) < thr


@jit
def _hash_mask_kernel(o_ptr, R, C, seed_ptr, thr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Writes the drop-mask (uint8) of :func:`_hash_dropped`; for tests and an explicit mask."""
    rr = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cc = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    d = _hash_dropped(rr, cc, seed_ptr, thr)
    tl.store(o_ptr + rr[:, None] * C + cc[None, :], d.to(tl.uint8), mask=(rr < R)[:, None] & (cc < C)[None, :])


def hash_drop_triton(rows: int, cols: int, seed: torch.Tensor, thr: int) -> torch.Tensor:
    """The drop-mask of :func:`_hash_drop_reference` computed by the Triton hash that the LoRA
    kernels use in place (CUDA, or the interpreter)."""
    out = torch.empty((rows, cols), dtype=torch.uint8, device=seed.device)
    if rows and cols:
        grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
        _hash_mask_kernel[grid](out, rows, cols, seed.reshape(1), int(thr), BLOCK_R=32, BLOCK_C=32)
    return out.view(torch.bool)


@jit
def _dropped_tile(m_ptr, smm, smn, seed_ptr, thr, rows, cols, valid, HAS_MASK: tl.constexpr,
                  HASH_DROP: tl.constexpr):
    """Drop-mask tile at (rows, cols): from a stored mask (``HAS_MASK``) or the hash (``HASH_DROP``)."""
    if HASH_DROP:
        return _hash_dropped(rows, cols, seed_ptr, thr)
    else:
        return tl.load(m_ptr + rows[:, None] * smm + cols[None, :] * smn, mask=valid, other=0) != 0


@jit
def _nf4_decode(data_ptr, absmax_ptr, code_ptr, flat, valid, NF4_BLOCK: tl.constexpr):
    """fp32 values of the NF4 elements at flat indices ``flat`` (int64), zero where not ``valid``."""
    byte = tl.load(data_ptr + flat // 2, mask=valid, other=0).to(tl.int32)
    nib = tl.where((flat % 2) == 0, byte >> 4, byte & 15)
    val = tl.load(code_ptr + nib, mask=valid, other=0.0)
    amax = tl.load(absmax_ptr + flat // NF4_BLOCK, mask=valid, other=0.0)
    return val * amax


@jit
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


@jit
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


@jit
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
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    the seed (:func:`_hash_dropped`); no mask is stored. A given mask comes as the bool ``drop``.
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


class _BaseTritonFn(torch.autograd.Function):
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


# ----------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------
def _check(x, weight, bias, A, B, nf4):
    if nf4 is None and weight is None:
        raise ValueError("lora_linear needs a base: `weight` or `nf4`")
    out_f, in_f = nf4.shape if nf4 is not None else tuple(weight.shape)
    if x.shape[-1] != in_f:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features but the base weight expects {in_f}")
    if weight is not None:
        if weight.dim() != 2:
            raise ValueError(f"lora_linear: weight must be 2-D, got shape {tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"lora_linear: x is {x.dtype} but weight is {weight.dtype}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("lora_linear: the base `weight` is frozen (no gradient); set requires_grad=False")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"lora_linear: bias shape {tuple(bias.shape)} != ({out_f},)")
    if (A is None) != (B is None):
        raise ValueError("lora_linear: pass both lora_A and lora_B, or neither")
    if A is not None:
        if A.dim() != 2 or A.shape[1] != in_f:
            raise ValueError(f"lora_linear: lora_A shape {tuple(A.shape)} != (r, {in_f})")
        if B.dim() != 2 or tuple(B.shape) != (out_f, A.shape[0]):
            raise ValueError(f"lora_linear: lora_B shape {tuple(B.shape)} != ({out_f}, {A.shape[0]})")


def _autocast_cast(t, dev: str, dtype: torch.dtype):
    if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.device.type != dev:
        return t
    return t.to(dtype)


def lora_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scale: float, *,
                dropout_p: float = 0.0, training: bool = True, dropout_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None, nf4: NF4Weight | None = None) -> torch.Tensor:
    """``y = x Wᵀ + b + scale·(drop(x) lora_Aᵀ) lora_Bᵀ`` over the last dim of ``x``.

    ``weight`` (out, in) is frozen; pass ``nf4`` (and ``weight=None``) for an NF4 base.
    ``lora_A=lora_B=None`` gives the base linear alone. Dropout (prob ``dropout_p``, when
    ``training``) masks ``x`` on the LoRA path only; ``dropout_mask`` (bool, x's shape) fixes
    the mask, rescaled by ``1/(1-dropout_p)``. A and B may be in another dtype than ``x``:
    products run in x's dtype with fp32 accumulation; their gradients come back in their own.
    Under ``torch.autocast`` for x's device, x, the base, bias, A and B are first cast to the
    autocast dtype (NF4 decodes to it), as autocast would for ``F.linear``.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # As autocast does for linear/matmul: floating inputs (not fp64) to the autocast dtype,
        # by differentiable casts (grads reach fp32 A/B/x through them); then run un-autocast.
        dt = torch.get_autocast_dtype(dev)
        x, weight, bias, lora_A, lora_B = (_autocast_cast(t, dev, dt) for t in (x, weight, bias, lora_A, lora_B))
        with torch.autocast(dev, enabled=False):
            return lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p=dropout_p, training=training,
                               dropout_mask=dropout_mask, generator=generator, nf4=nf4)
    _check(x, weight, bias, lora_A, lora_B, nf4)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    backend = backend_for(x, cpp="lora")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        backend = "torch"  # no tokens: nothing to launch
    if nf4 is not None and nf4.device != x.device:
        raise ValueError(f"lora_linear: nf4 weight is on {nf4.device} but x is on {x.device}")
    if lora_A is None:
        if backend == "triton":
            y = _BaseTritonFn.apply(x2, weight, bias, nf4)
        else:
            y = F.linear(x2, _dense_base(weight, nf4, x.dtype), bias)
        return y.reshape(*lead, y.shape[-1])
    if backend == "cpp" and not _cpp_ok(x2, weight, bias, lora_A, lora_B):
        backend = "torch"
    drop, keep, seed, thr = None, 1.0, None, 0
    if dropout_mask is not None:
        if tuple(dropout_mask.shape) != tuple(x.shape):
            raise ValueError(f"lora_linear: dropout_mask shape {tuple(dropout_mask.shape)} != x shape {tuple(x.shape)}")
        drop = ~dropout_mask.reshape(x2.shape).to(torch.bool)
        keep = 1.0 / (1.0 - dropout_p)
    elif dropout_p > 0.0 and training:
        seed, thr, keep = _drop_params(dropout_p, x.device, generator)
        if thr and backend == "torch":
            drop = _hash_drop(x2.shape[0], x2.shape[1], seed, thr)
    if backend == "cpp" and (drop is not None or thr):
        y = LoRALinearCppFn.apply(x2, weight, bias, lora_A, lora_B, float(scale), drop, keep, nf4,
                                  int(seed) if seed is not None and drop is None else 0, thr if drop is None else 0)
    elif backend == "triton":
        # sampled dropout: the kernels hash the mask from the seed in place (no mask in memory)
        y = LoRALinearTritonFn.apply(x2, weight, bias, lora_A, lora_B, float(scale), drop, keep, nf4,
                                     seed if drop is None else None, thr if drop is None else 0)
    else:
        y = LoRALinearTorchFn.apply(x2, weight, bias, lora_A, lora_B, float(scale), drop, keep, nf4)
    return y.reshape(*lead, y.shape[-1])

"""Fused LoRA linear: ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` with a frozen base ``W``.

Shapes: ``x`` (..., in), ``W`` (out, in), ``A`` (r, in), ``B`` (out, r), ``s`` the scale
(alpha/r, or alpha/sqrt(r) for rsLoRA). Dropout acts on ``x`` on the LoRA path only, as in
peft; its mask is counter-based (one 64-bit seed per call from the generator, then a hash of
row and column, see :mod:`qru.kernels.hash_dropout`), so the C++ and Triton kernels recompute it
where needed instead of storing it. ``W`` may be dense or NF4-packed (an nf4 :class:`qru.kernels.qtensor.QTensor`,
QLoRA style); it never gets a gradient. Under ``torch.autocast`` the inputs are cast to the
autocast dtype first, as for ``F.linear``.

One public entry, :func:`lora_linear`, picks the backend at call time:

* ``"triton"`` (CUDA, or ``QRU_BACKEND=triton`` with ``TRITON_INTERPRET=1``): a shrink kernel
  computes ``u = drop(x) Aᵀ`` (M × r, fp32); the base GEMM kernel adds ``s·u Bᵀ`` to its
  accumulator tile before the single store of ``y``. The backward reuses the two kernels for
  ``g = dY B`` and ``dX = dY W + s·(g A)⊙mask``, and an outer-product kernel reduces over
  tokens for ``dA`` and ``dB``. The NF4 base is decoded tile by tile inside the GEMM. Sampled
  dropout is hashed inside each kernel that needs it from the seed (no mask in memory). Tiles
  are autotuned on CUDA over :mod:`qru.kernels.lora_triton`'s ``GEMM_CONFIGS``, ``SHRINK_CONFIGS``,
  ``OUTER_CONFIGS``.
* ``"cpp"`` (CPU, fp32; the default when ``csrc/lora.cpp`` builds): with dropout, the three
  rank-r products that see the mask in C++ (AVX2/FMA micro-tiles, qru::Team), the mask applied as
  x is read and as dX is stored, so neither a dropped-out copy of x nor the mask is kept; the
  other GEMMs stay with torch. Without dropout, and for other dtypes, the torch path below.
* ``"torch"`` (CPU fallback, and bf16/fp16 on CPU): the same math as a custom autograd Function
  over ``addmm`` with ``beta``/``out`` accumulation, never materialising ``W + s·B A``.

On CPU the small work around the base GEMMs (the rank-r products through torch, masking, the bias
gradient) runs on one thread (:func:`one_thread`): each is a fraction of a millisecond, and
torch's parallel regions stall for a whole time slice when another job holds a core. The C++ thin
products run on ``qru::Team``, which does not stall, at torch's thread count.

The two frozen-base GEMMs run at torch's thread count (a run adapts it to the load with
``--threads adaptive``, :func:`qru.kernels.threads.step_threads`).

On CPU both paths run the two big frozen-base GEMMs (``x Wᵀ``, ``dY W``) through
:func:`qru.kernels.dense.dense_linear` (fp32: oneDNN with a fused add, about 2x MKL's sgemm
on the AVX-512 AMD development VM; torch's ``addmm`` otherwise).

:func:`lora_linear_reference` is the plain-autograd oracle the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qru.kernels import hash_dropout
from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels.dense import dense_linear
from qru.kernels.linear import PackedWeight, linear
from qru.kernels.lora_triton import BaseTritonFn, LoRALinearTritonFn
from qru.kernels.qtensor import QTensor
from qru.kernels.threads import step_threads

# ----------------------------------------------------------------------------------------
# NF4 base weight
# ----------------------------------------------------------------------------------------
def nf4_dequantize_reference(w: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode an nf4 :class:`QTensor` (out, in): ``code[nibble] * absmax[block]`` in fp32, then cast.
    Codes are 4-bit, two per byte, the even element in the high nibble."""
    n = w.shape[0] * w.shape[1]
    b = w.data.to(torch.int64)
    idx = torch.stack((b >> 4, b & 15), dim=1).reshape(-1)[:n]
    blocks = torch.arange(n, device=w.data.device) // w.block_size
    return (w.codebook()[idx] * w.absmax()[blocks]).reshape(w.shape).to(dtype)


def _check_nf4(q) -> None:
    if not isinstance(q, QTensor) or q.fmt != "nf4":
        what = f"a {q.fmt} QTensor" if isinstance(q, QTensor) else type(q).__name__
        raise TypeError(f"lora_linear: the nf4 base must be an nf4 QTensor (qru.quant.quantize(W, 'nf4')), got {what}")
    if len(q.shape) != 2:
        raise ValueError(f"lora_linear: the nf4 base must be 2-D (out, in), got shape {tuple(q.shape)}")
    n = q.shape[0] * q.shape[1]
    if q.data.dtype != torch.uint8 or q.data.numel() != (n + 1) // 2:
        raise ValueError(f"lora_linear: the nf4 base's data must hold {(n + 1) // 2} uint8 bytes for shape "
                         f"{tuple(q.shape)}, got {q.data.numel()} of {q.data.dtype}")
    if q.scales.numel() != -(-n // q.block_size):
        raise ValueError(f"lora_linear: the nf4 base must have {-(-n // q.block_size)} block scales (block_size "
                         f"{q.block_size}), got {q.scales.numel()}")


def make_dropout_mask(shape, p: float, device, generator: torch.Generator | None = None):
    """The keep-mask (bool, ``shape``) and rescale that :func:`lora_linear` draws for the same
    ``generator`` state (for an x of that shape). ``p`` is rounded to a multiple of 1/65536."""
    dropped, keep = hash_dropout.sample_drop(shape, p, device, generator)
    return ~dropped, keep


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, *, dropout_mask=None,
                          keep_scale: float = 1.0, nf4: QTensor | None = None) -> torch.Tensor:
    """Plain autograd composition (the peft math), used as the oracle in tests."""
    W = nf4.dequantize(x.dtype) if nf4 is not None else weight
    y = F.linear(x, W, bias)
    if lora_A is None:
        return y
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype) * keep_scale
    return y + scale * F.linear(F.linear(xd, lora_A.to(x.dtype)), lora_B.to(x.dtype))


def one_thread():
    """A block in which torch's intra-op thread count is 1 (restored after; ~0.2 µs a switch).

    For the thin LoRA products (rank r) and elementwise work on CPU: a torch parallel region with
    2+ threads ends when its last thread does, so on a machine where another job holds a core
    every such call can wait a scheduler time slice, many times what the product takes on one
    thread. One thread also makes these results independent of the thread count."""
    return step_threads(1)


# ----------------------------------------------------------------------------------------
# CPU path: reference math in a custom autograd Function
# ----------------------------------------------------------------------------------------
def _dense_base(weight, nf4: QTensor | None, dtype):
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
        with one_thread():
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
        dtype = gy.dtype
        dx = dA = dB = db = None
        with one_thread():  # everything but the base GEMM
            gy = gy.contiguous()
            Ac, Bc = A.to(dtype), B.to(dtype)
            gs = torch.mm(gy, Bc)
            gs.mul_(s * keep)  # (M, r): the scales ride on the thin factor
            if ctx.needs_input_grad[0]:
                dx = torch.mm(gs, Ac)
                if drop is not None:
                    dx.masked_fill_(drop, 0)
            if ctx.needs_input_grad[3]:
                dA = torch.mm(gs.t(), xd).to(A.dtype)
            if ctx.needs_input_grad[4]:
                dB = torch.mm(gy.t(), u)
                dB.mul_(s)
                dB = dB.to(B.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = gy.sum(0)
        if dx is not None:
            dx = dense_linear(gy, _dense_base(weight, nf4, dtype).t(), add=dx, accumulate=True)
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
    counter-based hash of (row, column) under ``seed``/``thr`` (see
    :func:`qru.kernels.hash_dropout.hash_drop_reference`), recomputed by each kernel that needs it
    and never stored; a given ``dropout_mask`` comes as the bool ``drop``. Without dropout MKL's thin GEMMs are as fast as these kernels (faster
    for r ≥ 32), so that case takes :class:`LoRALinearTorchFn`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, drop, keep, nf4, seed, thr):
        ext = load_cpp_ext("lora")
        W = _dense_base(weight, nf4, x.dtype)
        Ac = A.contiguous()
        u = ext.rowdot(x, Ac, keep, drop, seed, thr)
        with one_thread():
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
        dx = dA = dB = db = None
        with one_thread():
            gy = gy.contiguous()
            g = torch.mm(gy, B)
            if ctx.needs_input_grad[4]:
                dB = torch.mm(gy.t(), u)
                dB.mul_(s)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = gy.sum(0)
        if ctx.needs_input_grad[0]:
            dx = ext.expand(g, A, s * keep, None, drop, seed, thr)
            dx = dense_linear(gy, _dense_base(weight, nf4, gy.dtype).t(), add=dx, accumulate=True)
        if ctx.needs_input_grad[3]:
            dA = ext.tallreduce(g, x, s * keep, drop, seed, thr)
        return dx, None, db, dA, dB, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------
def _check(x, weight, bias, A, B, nf4):
    if nf4 is None and weight is None:
        raise ValueError("lora_linear needs a base: `weight` or `nf4`")
    if nf4 is not None:
        _check_nf4(nf4)
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
                generator: torch.Generator | None = None, nf4: QTensor | None = None,
                packed: PackedWeight | None = None) -> torch.Tensor:
    """``y = x Wᵀ + b + scale·(drop(x) lora_Aᵀ) lora_Bᵀ`` over the last dim of ``x``.

    ``weight`` (out, in) is frozen; pass ``nf4`` (and ``weight=None``) for an NF4 base.
    ``lora_A=lora_B=None`` gives the base linear alone: off CUDA that is the one linear dispatch
    (:func:`qru.kernels.linear.linear`, with ``packed`` the caller's cache slot for a dense
    base's packed weight). Dropout (prob ``dropout_p``, when
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
                               dropout_mask=dropout_mask, generator=generator, nf4=nf4, packed=packed)
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
            y = BaseTritonFn.apply(x2, weight, bias, nf4)
        else:
            y = linear(x2, _dense_base(weight, nf4, x.dtype), bias, packed if nf4 is None else None)
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
        seed, thr, keep = hash_dropout.drop_params(dropout_p, x.device, generator)
        if thr and backend == "torch":
            drop = hash_dropout.hash_drop(x2.shape[0], x2.shape[1], seed, thr)
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

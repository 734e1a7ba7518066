"""Fused output projection + log-softmax + gather: per-token log-probs straight from hidden states.

    z = h Wᵀ            h: (N, H) hidden states, W: (V, H) the lm_head weight
    logp[n] = z[n, y[n]] - logsumexp_v z[n, v]        (0 where y[n] == ignore_index)

The rows are processed in chunks, so the (N, V) logits, their softmax and their gradient
never exist in full: one (chunk, V) block at a time. ``z`` is computed in the dtype of ``h``
and ``W`` (bf16 under autocast, as ``F.linear`` would) and the softmax math runs in fp32,
exactly like ``log_softmax(linear(h, W).float())``.

One public entry, :func:`linear_logprobs`, picks the backend at call time:

* ``"triton"`` (CUDA, or ``QRU_BACKEND=triton`` with ``TRITON_INTERPRET=1``): the chunk GEMMs
  are ``torch.mm`` (cuBLAS); two row kernels do the rest in one pass each over the chunk: an
  online logsumexp + target gather, and the in-place logits -> gradient transform.
* ``"cpp"`` (CPU, ``csrc/linear_logprobs.cpp``): AVX2 row kernels, one row at a time while it
  sits in L2: max, exp-sum (exp written back when the gradient is wanted), scale.
* ``"torch"`` (CPU without a compiler): the same chunk loop with torch row ops.

The chunk GEMMs go through :func:`qru.kernels.dense.dense_linear` (fp32 CPU: oneDNN; else torch).

:func:`linear_logprobs_reference` (plain autograd over the full logits) is the oracle.
"""
from __future__ import annotations


import torch
import triton.language as tl

from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels.dense import dense_linear
from qru.kernels._triton_io import jit, kernel_view, load_f32, row_block, row_logsumexp, store_f32

IGNORE_INDEX = -100
# Rows per chunk, bounded by the bytes of one fp32 (chunk, V) block. On CPU each row is processed while
# it sits in L2 whatever the chunk; chunks of ~1000 rows keep the GEMMs efficient (M >= 1024 at V = 32000).
CPU_CHUNK_BYTES = 128 << 20
CUDA_CHUNK_BYTES = 512 << 20
# Bound on the per-group (G, V, H) fp32 weight-gradient partials of the "grouped" strategy.
GROUPED_BYTES = 512 << 20
# Bound on the (N, V) unit gradients the "stored" strategy keeps for backward (in the logits' dtype).
STORED_BYTES = 256 << 20


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The oracle: full logits, fp32 ``log_softmax``, gather; 0 where ``labels == ignore_index``."""
    z = torch.nn.functional.linear(hidden, weight).float()
    lp = z.log_softmax(-1)
    keep = labels != ignore_index
    out = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------
# Row kernels (Triton)
# ----------------------------------------------------------------------------------------
@jit
def _lse_gather_kernel(z_ptr, stride_z, y_ptr, lse_ptr, logp_ptr, V, ignore_index,
                       BLOCK_V: tl.constexpr, IN_BF16: tl.constexpr):
    """One program per row: online logsumexp over V, then logp = z[y] - lse (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    lse = row_logsumexp(base, V, BLOCK_V, IN_BF16)
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    yc = tl.where(valid, y, 0)
    t = tl.sum(load_f32(base, yc + offs, offs < 1, IN_BF16), 0)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, t - lse, 0.0))


@jit
def _dlogits_kernel(z_ptr, stride_z, y_ptr, lse_ptr, g_ptr, V, ignore_index,
                    BLOCK_V: tl.constexpr, IN_BF16: tl.constexpr):
    """In place: z[n, :] <- g[n]·(e_{y[n]} - softmax(z[n, :])) (0 for ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    lse = tl.load(lse_ptr + row)
    y = tl.load(y_ptr + row)
    g = tl.load(g_ptr + row).to(tl.float32)
    g = tl.where(y != ignore_index, g, 0.0)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        o = start + offs
        inside = o < V
        x = load_f32(base, o, inside, IN_BF16)
        d = g * (tl.where(o == y, 1.0, 0.0) - tl.exp(x - lse))
        store_f32(base, o, d, inside, IN_BF16)


def _rows_lse_triton(z, y, ignore_index, block_v=None):
    n, V = z.shape
    lse = torch.empty(n, device=z.device, dtype=torch.float32)
    logp = torch.empty(n, device=z.device, dtype=torch.float32)
    if n:
        _lse_gather_kernel[(n,)](kernel_view(z), z.stride(0), y, lse, logp, V, ignore_index,
                                 BLOCK_V=block_v or row_block(V), IN_BF16=z.dtype == torch.bfloat16)
    return lse, logp


def _rows_dlogits_triton(z, y, lse, g, ignore_index, block_v=None):
    n, V = z.shape
    if n:
        _dlogits_kernel[(n,)](kernel_view(z), z.stride(0), y, lse, g, V, ignore_index,
                              BLOCK_V=block_v or row_block(V), IN_BF16=z.dtype == torch.bfloat16)
    return z


# ----------------------------------------------------------------------------------------
# Row ops (torch)
# ----------------------------------------------------------------------------------------
def _rows_lse_torch(z, y, ignore_index):
    zf = z.float()
    lse = torch.logsumexp(zf, -1)
    valid = y != ignore_index
    t = zf.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    return lse, torch.where(valid, t - lse, torch.zeros_like(t))


def _rows_dlogits_torch(z, y, lse, g, ignore_index):
    zf = z if z.dtype == torch.float32 else z.float()
    g = torch.where(y != ignore_index, g.float(), torch.zeros_like(lse))
    p = zf.sub_(lse[:, None]).exp_()  # softmax, in place
    p.mul_(-g[:, None])
    p.scatter_add_(1, y.clamp(min=0)[:, None], g[:, None])
    if p is not z:
        z.copy_(p)
    return z


def _cpp_ext():
    return load_cpp_ext("linear_logprobs")


def _rows(backend):
    """(lse(z, y, ig) -> (lse, logp), lse_unit_grad(z, y, ig) -> (lse, logp) with z <- e_y - softmax(z),
    dlogits(z, y, lse, g, ig) -> z <- g (e_y - exp(z - lse))) for a backend."""
    if backend == "cpp":
        ext = _cpp_ext()
        return (lambda z, y, ig: ext.lse_gather(z, y, ig, False),
                lambda z, y, ig: ext.lse_gather(z, y, ig, True),
                lambda z, y, lse, g, ig: ext.dlogits_(z, y, lse, g, ig))
    lse_fn, dz_fn = ((_rows_lse_triton, _rows_dlogits_triton) if backend == "triton"
                     else (_rows_lse_torch, _rows_dlogits_torch))

    def lse_unit_grad(z, y, ig):
        lse, logp = lse_fn(z, y, ig)
        dz_fn(z, y, lse, torch.ones_like(lse), ig)
        return lse, logp
    return lse_fn, lse_unit_grad, dz_fn


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------
class LinearLogprobsFn(torch.autograd.Function):
    """Chunked ``logp = gather(log_softmax(h Wᵀ), y)``.

    Backward. With ``p_n = softmax(z_n)`` and the upstream gradient ``g_n = ∂L/∂logp_n``:
    ``∂logp_n/∂z_n = e_{y_n} - p_n``, so ``D_n := ∂L/∂z_n = g_n (e_{y_n} - p_n)`` (``D_n = 0`` for
    an ignored row, whose logp is the constant 0). As ``z_n = W h_n``:
    ``∂L/∂h_n = D_n W`` and ``∂L/∂W = Σ_n D_nᵀ h_n = Dᵀ h``. Write ``U'_n = e_{y_n} - p_n`` (the
    unit gradient, known in forward) so ``D_n = g_n U'_n``.

    Four strategies, chosen in forward:

    * ``"unit"``: ``W`` needs no gradient (LoRA, frozen head). ``∂L/∂h_n = g_n (U'_n W)``: forward
      holds each chunk's softmax anyway and computes ``U = U' W`` (N, H) right there, the one
      GEMM backward would run; backward is ``dh = g[:, None]·U``. No recomputation.
    * ``"grouped"``: ``W`` needs a gradient and the rows come in ``G`` contiguous groups (sequences)
      whose upstream gradient is constant per group (``g_n = c_b``, as when the log-probs are
      summed per sequence and the loss depends on the sums). Then
      ``∂L/∂W = Σ_b c_b Σ_{n∈b} U'_nᵀ h_n``: forward accumulates one (V, H) fp32 partial per group
      (bounded by ``GROUPED_BYTES``) next to ``U``; backward checks ``g`` is constant per group
      and combines ``dW = Σ_b c_b M_b``, ``dh = g[:, None]·U``: the GEMMs unfused autograd runs,
      no recomputation. If ``g`` turns out not to be constant per group, it recomputes as below.
      A group whose rows are all ignored (the padding rows ``hidden_sequence_logprobs`` adds) has
      ``M_b = 0``: it gets no partial and no GEMM. Each partial is the GEMM's own output (oneDNN
      returns a new tensor), kept as is, not copied into a preallocated stack.
    * ``"stored"``: ``W`` needs a gradient and ``U'`` (N, V), in the logits' dtype (bf16 under
      autocast), fits ``STORED_BYTES`` and is no larger than the grouped partials would be (for a
      small model's head: 1024 rows of a 32000-word vocabulary take 131 MB in fp32, four sequences'
      partials at hidden 512 take 262 MB): forward keeps each chunk's ``U'``; backward runs
      ``dW = Dᵀ h = U'ᵀ (g ⊙ h)`` (any ``g``) once per chunk, in the logits' dtype (one
      bf16 GEMM under autocast, where the grouped partials were fp32 GEMMs plus fp32 casts).
    * ``"recompute"``: forward saves ``h`` and the per-row ``lse``; backward recomputes each chunk's
      ``z``, turns it in place into ``D = g(e_y - exp(z - lse))``, and runs ``dh = D W``,
      ``dW += Dᵀ h`` (one extra (chunk, V, H) GEMM per chunk).
    """

    @staticmethod
    def forward(ctx, h, weight, y, group_sizes, ignore_index, chunk, backend):
        lse_fn, unit_fn, _ = _rows(backend)
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        strategy = None
        if need_h and not need_w:
            strategy = "unit"
        elif need_w:
            dev = h.device.type
            low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
            stored = n * weight.shape[0] * (2 if low in (torch.bfloat16, torch.float16) else 4)
            grouped = (None if group_sizes is None
                       else group_sizes.numel() * weight.shape[0] * weight.shape[1] * 4)
            if grouped is not None and grouped > GROUPED_BYTES:
                grouped = None
            if stored <= STORED_BYTES and (grouped is None or stored <= grouped):
                strategy = "stored"
            else:
                strategy = "grouped" if grouped is not None else "recompute"
        lse = torch.empty(n, device=h.device, dtype=torch.float32)
        logp = torch.empty(n, device=h.device, dtype=torch.float32)
        eager = strategy in ("unit", "grouped", "stored")
        kept = [] if strategy == "stored" else None
        u = torch.empty((n, h.shape[1]), device=h.device, dtype=h.dtype) if eager and need_h else None
        parts, bounds = None, None
        if strategy == "grouped":
            ends = group_sizes.cumsum(0).tolist()
            bounds = list(zip([0] + ends[:-1], ends))
            valid = torch.cat([y.new_zeros(1), (y != ignore_index).cumsum(0)]).tolist()
            live = [valid[g1] > valid[g0] for g0, g1 in bounds]  # groups with a row that is not ignored
            parts = [None] * len(bounds)  # M_b, fp32 (V, H); None: no row yet (zero)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z = dense_linear(h[s:e], weight)
            if not eager:
                lse[s:e], logp[s:e] = lse_fn(z, y[s:e], ignore_index)
                continue
            lse[s:e], logp[s:e] = unit_fn(z, y[s:e], ignore_index)  # z <- U' = e_y - softmax(z)
            if u is not None:
                u[s:e] = dense_linear(z, weight.t())
            if kept is not None:
                kept.append(z)
            if parts is not None:  # M_b += U'ᵀ h over this chunk's rows of group b
                for b, (g0, g1) in enumerate(bounds):
                    r0, r1 = max(s, g0), min(e, g1)
                    if r0 >= r1 or not live[b]:
                        continue
                    zt, hh = z[r0 - s:r1 - s].t(), h[r0:r1]
                    if z.dtype == torch.float32:  # oneDNN: a new tensor; torch: into parts[b] in place
                        parts[b] = dense_linear(zt, hh.t(), add=parts[b], accumulate=True)
                    elif parts[b] is not None:
                        parts[b] += torch.mm(zt, hh)
                    else:
                        parts[b] = torch.mm(zt, hh).float()
        ctx.strategy, ctx.chunk, ctx.ignore_index, ctx.backend = strategy, chunk, ignore_index, backend
        ctx.bounds = bounds
        ctx.live = None if parts is None else [p is not None for p in parts]
        extra = kept if kept is not None else [p for p in parts or () if p is not None]
        ctx.save_for_backward(h, weight, y, lse, u, group_sizes, *extra)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        g = g.float().contiguous()
        h, weight, y, lse, u, group_sizes, *parts = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.strategy == "unit":
            return (u * g[:, None]).to(u.dtype), None, None, None, None, None, None
        if ctx.strategy == "stored":
            return LinearLogprobsFn._stored(g, h, weight, u, parts, need_h)
        if ctx.strategy == "grouped":
            c = torch.zeros(group_sizes.shape, device=g.device, dtype=g.dtype)  # c_b = g at group b's first row
            nonempty = group_sizes > 0
            c[nonempty] = g[(group_sizes.cumsum(0) - group_sizes)[nonempty]]
            if torch.equal(g, c.repeat_interleave(group_sizes)):
                dh = (u * g[:, None]).to(u.dtype) if need_h else None
                cs = [c[b] for b, t in enumerate(ctx.live) if t]  # the groups with a partial, in order
                if parts:
                    dw = parts[0] * cs[0]
                    for p, cb in zip(parts[1:], cs[1:]):
                        dw.addcmul_(p, cb)
                    dw = dw.to(weight.dtype)
                else:
                    dw = torch.zeros_like(weight)
                return dh, dw, None, None, None, None, None
        return LinearLogprobsFn._recompute(ctx, g, h, weight, y, lse, need_h, need_w)

    @staticmethod
    def _stored(g, h, weight, u, kept, need_h):
        """dh = g·U; dW = Σ_chunks U'ᵀ (g ⊙ h) from the kept unit gradients, in their dtype."""
        dh = (u * g[:, None]).to(u.dtype) if need_h else None
        dw, s = None, 0
        for zk in kept:
            e = s + zk.shape[0]
            # Dᵀ h = (diag(g) U')ᵀ h = U'ᵀ (g ⊙ h): the rows of h (N x H) scaled, not those of U' (N x V)
            hh = (h[s:e] * g[s:e, None]).to(zk.dtype)
            if zk.dtype == torch.float32:  # the first chunk writes dW, the others add to it
                dw = dense_linear(zk.t(), hh.t(), add=dw, accumulate=True)
            else:
                m = torch.mm(zk.t(), hh)
                if dw is None:  # a half-precision running sum would round per chunk: fp32 from the second
                    dw = m
                else:
                    dw = (dw.float() if dw.dtype != torch.float32 else dw).add_(m)
            s = e
        dw = torch.zeros_like(weight) if dw is None else dw.to(weight.dtype)
        return dh, dw, None, None, None, None, None

    @staticmethod
    def _recompute(ctx, g, h, weight, y, lse, need_h, need_w):
        dz_fn = _rows(ctx.backend)[2]
        dh = torch.empty_like(h) if need_h else None
        # dW accumulates over chunks in fp32 (a half-precision running sum would round per chunk)
        dw = torch.empty(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        if dw is not None and h.shape[0] == 0:
            dw.zero_()
        for s in range(0, h.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, h.shape[0])
            z = dense_linear(h[s:e], weight)
            dz = dz_fn(z, y[s:e], lse[s:e], g[s:e], ctx.ignore_index)
            if dh is not None:
                dh[s:e] = dense_linear(dz, weight.t())
            if dw is not None:  # the first chunk writes dW, the others add to it
                if dz.dtype == torch.float32:
                    dw = dense_linear(dz.t(), h[s:e].t(), add=None if s == 0 else dw, accumulate=True)
                elif s == 0:
                    dw.copy_(torch.mm(dz.t(), h[s:e]))
                else:
                    dw += torch.mm(dz.t(), h[s:e])
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------
def default_chunk(n: int, vocab: int, device: torch.device) -> int:
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(1, min(n, budget // (4 * vocab)))


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None,
                    group_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``log softmax(hidden Wᵀ)[labels]`` over the last dim of ``hidden``; 0 where ignored.

    ``hidden`` (..., H), ``weight`` (V, H), ``labels`` (...) integer in ``[0, V)`` or
    ``ignore_index``. Equals :func:`linear_logprobs_reference` up to float round-off, with
    gradients for ``hidden`` and ``weight``. ``group_sizes`` (G,) optionally says the flattened
    rows form G consecutive groups (e.g. sequences) whose log-probs will be summed; it only
    selects a faster backward for a trainable ``weight`` (see :class:`LinearLogprobsFn`), never
    the result. Under ``torch.autocast`` for the device, ``hidden`` and ``weight`` are cast to the
    autocast dtype first, as for ``F.linear``.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and hidden.is_floating_point():
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return linear_logprobs(hidden.to(dt), weight.to(dt), labels, ignore_index=ignore_index,
                                   chunk_size=chunk_size, group_sizes=group_sizes)
    if weight.dim() != 2:
        raise ValueError(f"linear_logprobs: weight must be (vocab, hidden), got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"linear_logprobs: hidden has {hidden.shape[-1]} features, weight expects {H}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_logprobs: labels shape {tuple(labels.shape)} != hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"linear_logprobs: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"linear_logprobs: labels must be integers, got {labels.dtype}")
    if weight.device != hidden.device or labels.device != hidden.device:
        raise ValueError(f"linear_logprobs: hidden ({hidden.device}), weight ({weight.device}) and labels "
                         f"({labels.device}) must share a device")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"linear_logprobs: chunk_size must be a positive integer, got {chunk_size!r}")
    lead = labels.shape
    h = hidden.reshape(-1, H)
    if not h.is_contiguous():
        h = h.contiguous()
    y = labels.reshape(-1).long().contiguous()
    bad = ((y < 0) & (y != ignore_index)) | (y >= V)
    if bool(bad.any()):
        raise ValueError(f"linear_logprobs: label {int(y[bad][0])} is outside [0, {V}) and is not "
                         f"ignore_index={ignore_index}")
    if group_sizes is not None:
        group_sizes = group_sizes.to(device=h.device, dtype=torch.long).reshape(-1)
        if bool((group_sizes < 0).any()) or int(group_sizes.sum()) != h.shape[0]:
            raise ValueError(f"linear_logprobs: group_sizes must be non-negative and sum to the {h.shape[0]} rows, "
                             f"got sum {int(group_sizes.sum())}")
    chunk = chunk_size or default_chunk(h.shape[0], V, hidden.device)
    backend = backend_for(h, cpp="linear_logprobs")
    return LinearLogprobsFn.apply(h, weight, y, group_sizes, ignore_index, chunk, backend).view(lead)

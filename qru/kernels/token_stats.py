"""Per-token statistics of next-token distributions, for membership scores (Min-K%, Min-K%++).

    lse = logsumexp(z),   lp = z[y] - lse,   p = exp(z - lse)
    mu  = Σ_v p_v (z_v - lse)             (the expected log-prob)
    var = Σ_v p_v (z_v - lse - mu)²       (centred: two passes, no E[x²] - E[x]² cancellation)

for logits z (N, V) in fp32 or bf16 and targets y (N,); everything in fp32. Min-K%++ needs
``(lp - mu) / sqrt(var)``; computing it from ``log_softmax`` in torch makes four (N, V)
temporaries (log-probs, probs and two products), this makes none.

One public entry, :func:`token_stats`, picks the backend at call time: ``"triton"`` (CUDA, or
``QRU_BACKEND=triton`` with ``TRITON_INTERPRET=1``): one program per row, three passes over it in
blocks; ``"cpp"`` (``csrc/token_stats.cpp``): AVX-512 row loops while the row sits in cache;
``"torch"``: the same two-pass formulas with torch ops in fp32. Inference only (no autograd).
:func:`token_stats_reference` (fp64 ``log_softmax``) is the oracle.
"""
from __future__ import annotations


import torch
import triton.language as tl

from qru.kernels._backend import backend_for, load_cpp_ext
from qru.kernels._triton_io import jit, kernel_view, load_f32, row_block, row_logsumexp


def token_stats_reference(logits: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The oracle: fp64 log-softmax, gather, mean and centred variance; returned in fp32."""
    lsm = torch.log_softmax(logits.double(), dim=-1)
    lp = lsm.gather(-1, targets[:, None]).squeeze(-1)
    p = lsm.exp()
    mu = (p * lsm).sum(-1)
    var = (p * (lsm - mu[:, None]) ** 2).sum(-1)
    return lp.float(), mu.float(), var.float()


def _stats_torch(z: torch.Tensor, y: torch.Tensor):
    zf = z.float()
    lsm = zf - torch.logsumexp(zf, -1, keepdim=True)
    p = lsm.exp()
    mu = (p * lsm).sum(-1)
    var = (p * (lsm - mu[:, None]).square()).sum(-1)
    return lsm.gather(-1, y[:, None]).squeeze(-1), mu, var


@jit
def _stats_kernel(z_ptr, stride_z, y_ptr, lp_ptr, mu_ptr, var_ptr, V,
                  BLOCK_V: tl.constexpr, IN_BF16: tl.constexpr):
    """One program per row: online logsumexp, then the mean and the centred variance of z - lse."""
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    lse = row_logsumexp(base, V, BLOCK_V, IN_BF16)
    mu = 0.0
    for start in range(0, V, BLOCK_V):
        o = start + offs
        d = load_f32(base, o, o < V, IN_BF16) - lse
        mu += tl.sum(tl.where(o < V, tl.exp(d) * d, 0.0), 0)
    var = 0.0
    for start in range(0, V, BLOCK_V):
        o = start + offs
        d = load_f32(base, o, o < V, IN_BF16) - lse
        var += tl.sum(tl.where(o < V, tl.exp(d) * (d - mu) * (d - mu), 0.0), 0)
    y = tl.load(y_ptr + row)
    t = tl.sum(load_f32(base, y + offs, offs < 1, IN_BF16), 0)
    tl.store(lp_ptr + row, t - lse)
    tl.store(mu_ptr + row, mu)
    tl.store(var_ptr + row, var)


def _stats_triton(z: torch.Tensor, y: torch.Tensor, block_v: int | None = None):
    n, V = z.shape
    out = [torch.empty(n, device=z.device, dtype=torch.float32) for _ in range(3)]
    if n:
        _stats_kernel[(n,)](kernel_view(z), z.stride(0), y, *out, V, BLOCK_V=block_v or row_block(V),
                            IN_BF16=z.dtype == torch.bfloat16)
    return tuple(out)


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lp, mu, var)`` per row, fp32 (N,) each; see the module docstring."""
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"token_stats: logits must be (N, V) and targets (N,); got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"token_stats: logits must be floating point, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("token_stats: empty vocabulary (V = 0)")
    y = targets.to(device=logits.device, dtype=torch.long).contiguous()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"token_stats: targets must lie in [0, {logits.shape[1]}), got "
                         f"[{int(y.min())}, {int(y.max())}]")
    z = logits.detach()
    if z.stride(-1) != 1:
        z = z.contiguous()
    backend = backend_for(z, cpp="token_stats")
    if z.dtype not in (torch.float32, torch.bfloat16):  # fp16 / fp64: torch ops in fp32
        backend = "torch"
    if backend == "triton":
        return _stats_triton(z, y)
    if backend == "cpp":
        return tuple(load_cpp_ext("token_stats").token_stats(z, y))
    return _stats_torch(z, y)

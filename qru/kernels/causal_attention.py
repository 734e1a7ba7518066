"""Causal self-attention over whole sequences (prefill and scoring forwards), CPU inference.

    s_ij = q_i·k_j / √D (fp32),  j <= i,   out_i = Σ_j softmax_j(s_i) v_j  (fp32, cast once)

q (B, H, T, D); k, v (B, KV, T, D) with H a multiple of KV (grouped-query heads: head h reads kv
head h // (H/KV)). One public entry, :func:`causal_attention`:

* ``"cpp"`` (``csrc/attention.cpp``; CPU, no autograd, fp32/bf16, a head dim that is a multiple
  of 16 on an AVX-512 CPU): flash attention on 8 query rows x 16 keys per block, only up to the
  diagonal; ``bench/bench_attention.py`` times it against SDPA's CPU flash kernel in the same run.
* otherwise ``F.scaled_dot_product_attention(is_causal=True)``: CUDA (flash), autograd, other
  CPUs and head dims, and ``QRU_BACKEND=torch``.

The result is (B, H, T, D) over (B, T, H, D) memory, so the model's ``transpose(1, 2).reshape``
is a view. :func:`causal_attention_reference` (fp32 matmuls, an explicit causal mask) is the oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qru.kernels._backend import backend_for, load_cpp_ext


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The oracle: fp32 scores, a lower-triangular mask, softmax and weighted sum."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)).mul_(D ** -0.5)
    s.masked_fill_(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.matmul(s.softmax(-1), vf).to(q.dtype)


def _cpp_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if backend_for(q, cpp="attention") != "cpp":
        return False
    return bool(load_cpp_ext("attention").causal_attn_vectorized(q.shape[-1]))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ/√D, causal) v`` with as many keys as queries; see the module docstring."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[1] == 0 or q.shape[1] % k.shape[1] \
            or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"causal_attention: q {tuple(q.shape)} must be (B, H, T, D) and k, v (B, KV, T, D) with "
                         f"H a multiple of KV; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.device.type == "cpu" and _cpp_ok(q, k, v):
        return load_cpp_ext("attention").causal_attn(q, k, v, q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

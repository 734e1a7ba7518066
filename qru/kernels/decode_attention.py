"""Attention of one query position against a KV cache (the decode step of generation), CPU.

    s_j = q·k_j / √D (fp32),  masked keys -> -inf,  out = Σ_j softmax(s)_j v_j (fp32, cast once)

q (B, H, 1, D); k, v (B, KV, S, D) with H a multiple of KV (grouped-query heads: head h reads
kv head h // (H/KV)); mask (B, 1, 1, S) bool (True = attend) or None. One public entry,
:func:`decode_attention`: ``"cpp"`` (``csrc/llama_ops.cpp``) reads the bf16/fp32 cache in place
and accumulates in fp32, one (batch, head) per qru::Team item; ``"torch"``:
:func:`decode_attention_reference`, two fp32 batched matmuls (it converts the cache to fp32 on
every call). Both replace SDPA's CPU flash kernel, which spends ~0.7 ms per decode call at
B 8, H 8, S 130 (the reference ~0.17 ms). Inference only (no autograd); CUDA keeps SDPA.
"""
from __future__ import annotations

import torch

from qru.kernels._backend import backend_for, load_cpp_ext


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mask: torch.Tensor | None) -> torch.Tensor:
    """The oracle: fp32 scores, softmax and weighted sum as batched matmuls."""
    B, H, _, D = q.shape
    KV = k.shape[1]
    qg = q.reshape(B, KV, H // KV, D).float()
    s = torch.matmul(qg, k.float().transpose(-1, -2)).mul_(D ** -0.5)  # (B, KV, G, S)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    out = torch.matmul(s.softmax(-1), v.float())  # (B, KV, G, D)
    return out.to(q.dtype).reshape(B, H, 1, D)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q kᵀ/√D, masked) v`` for one query position; see the module docstring."""
    if q.dim() != 4 or q.shape[2] != 1 or k.dim() != 4 or k.shape != v.shape or k.shape[1] == 0 \
            or q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} must be (B, H, 1, D) and k, v (B, KV, S, D) with "
                         f"H a multiple of KV; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    ok = (q.dtype in (torch.float32, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
          and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and not torch.is_grad_enabled())
    if ok and backend_for(q, cpp="llama_ops") == "cpp":
        m = None
        if mask is not None:  # the kernel takes one (B, S) row per batch entry, shared by the heads
            if mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.dtype != torch.bool:
                return decode_attention_reference(q, k, v, mask)
            m = mask[:, 0, 0, :].expand(q.shape[0], k.shape[2]).contiguous()
        return load_cpp_ext("llama_ops").decode_attn(q, k, v, m, q.shape[-1] ** -0.5)
    return decode_attention_reference(q, k, v, mask)

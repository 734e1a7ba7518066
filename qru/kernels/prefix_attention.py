"""Attention to a prefix shared by every row of a batch, held once, followed by each row's own keys.

Few-shot prompts repeat the same in-context examples in every row of a batch. The prefix's
keys/values ``pk``/``pv`` (KV, P, D) are kept as one copy; each row's own keys ``k``/``v`` (B, KV, S,
D: suffix and new tokens) follow under a mask. :func:`prefix_attention` attends to both parts
separately and merges the two softmax pieces by their log-sum-exps (as flash attention merges
blocks), so a decode step reads the prefix once for the whole batch instead of once per row::

    o_p, l_p = attn(q, pk, pv)            (every query sees the whole prefix)
    o_s, l_s = attn(q, k, v, mask)        (l: the log-sum-exp of the scaled scores, fp32)
    l = logaddexp(l_p, l_s);   out = o_p·exp(l_p - l) + o_s·exp(l_s - l)

which is softmax attention over the concatenated keys. Each part runs on torch's CPU flash
kernel (which returns the log-sum-exp) where it exists, else on fp32 matmuls in chunks of rows
(:func:`attend_reference`, also the oracle's pieces). Inference only; ``qru.model.llama.Attention``
calls it when its KV cache holds a shared prefix (``KVCache.prefix_keys``).
"""
from __future__ import annotations

import torch

_CHUNK = 1 << 22  # score elements per chunk of rows in the plain merged attention
# Flash attention that also returns the log-sum-exp of each query's scores (CPU kernel).
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _grouped_mask(mask: torch.Tensor | None, B: int, g: int, T: int, S: int, device) -> torch.Tensor:
    """The (B or 1, 1, g*T, S) bool mask of the per-row keys for queries grouped by key head
    (query index j*T + t is head j of the group at position t); None means causal, S == T."""
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
    m = mask[:, :, None].expand(mask.shape[0], 1, g, T, S)
    return m.reshape(mask.shape[0], 1, g * T, S)


def _softmax_parts(scores: torch.Tensor, values: torch.Tensor):
    """softmax(scores) @ values and the log-sum-exp of each row of scores (in place on scores)."""
    m = scores.amax(-1, keepdim=True)
    e = scores.sub_(m).exp_()
    s = e.sum(-1, keepdim=True)
    return torch.matmul(e, values) / s, (m + s.log()).squeeze(-1)


def attend_reference(q, k, v, mask, scale):
    """(output, log-sum-exp) by fp32 matmuls: the path without the flash kernel."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return _softmax_parts(s, v.float())


def _attend(q, k, v, mask, scale):
    """(softmax attention output, log-sum-exp) of q (N, KV, L, D) over k/v (N, KV, S, D), fp32;
    ``mask`` bool broadcastable to (N, 1, L, S) or None."""
    if _FLASH is not None and q.device.type == "cpu":
        fm = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~mask, float("-inf"))
        o, lse = _FLASH(q, k, v, attn_mask=fm, scale=scale)
        return o.float(), lse.float()
    return attend_reference(q, k, v, mask, scale)


def prefix_attention(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``q`` (B, H, T, D) over a prefix every row sees in full (``pk``/``pv``:
    (KV, P, D), one copy) followed by per-row keys ``k``/``v`` (B, KV, S, D) under ``mask``
    (bool, broadcastable to (B, 1, T, S); None: causal with S == T). GQA: query head h reads
    key/value head h // (H // KV). The two parts' outputs are merged by their log-sum-exps
    (fp32); the result equals softmax attention over the concatenated keys up to round-off."""
    B, H, T, D = q.shape
    KV, S, g = k.shape[1], k.shape[2], H // k.shape[1]
    scale = D ** -0.5
    qg = q.reshape(B, KV, g * T, D)
    gm = _grouped_mask(mask, B, g, T, S, q.device)
    out = torch.empty((B, KV, g * T, D), dtype=torch.float32, device=q.device)
    flash = _FLASH is not None and q.device.type == "cpu"
    step = B if flash else max(1, _CHUNK // max(1, KV * g * T * max(pk.shape[1], S)))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        n = b1 - b0
        # the shared prefix: every row's queries of a key/value head against one copy of its keys
        qp = qg[b0:b1].transpose(0, 1).reshape(1, KV, n * g * T, D)
        op, lp = _attend(qp, pk[None], pv[None], None, scale)
        op, lp = op.view(KV, n, g * T, D).transpose(0, 1), lp.view(KV, n, g * T).transpose(0, 1)
        # the rows' own keys (suffix and new tokens)
        os_, ls = _attend(qg[b0:b1], k[b0:b1], v[b0:b1], gm[b0:b1] if gm.shape[0] > 1 else gm, scale)
        lse = torch.logaddexp(lp, ls)
        out[b0:b1] = op * (lp - lse).exp_()[..., None] + os_ * (ls - lse).exp_()[..., None]
    return out.view(B, H, T, D).to(q.dtype)

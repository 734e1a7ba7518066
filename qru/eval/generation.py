"""Batched greedy generation for evaluation, with a shared prefix attended once.

Few-shot prompts (MUSE KnowMem) repeat the same in-context examples in every prompt: the
rows of a batch share a long token prefix. ``generate_batched`` prefills that prefix once
(batch 1) and keeps its keys/values as one copy; the per-row suffixes (left padded) and the
new tokens go to a per-row cache. Each attention layer then attends to both parts and merges
the two softmax pieces (their maxima and sums, as flash attention merges blocks), so a decode
step reads the prefix's keys/values once for the whole batch instead of once per row -- the
bulk of the step's memory traffic when the prefix is long. Positions continue after the prefix.

Batches without a useful shared prefix, or with a prompt longer than the context allows,
go through ``qru.model.generate.generate`` unchanged. Results equal ``generate``'s up to
floating-point round-off (tested).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Sequence

import torch

from qru.kernels.rope import rope
from qru.model.generate import decode_new, generate, generate_ids, left_pad, stop_checker
from qru.model.llama import Attention

_CHUNK = 1 << 22  # score elements per chunk of rows in the plain merged attention
# Flash attention that also returns the log-sum-exp of each query's scores (CPU kernel).
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _lcp(rows: Sequence[Sequence[int]]) -> int:
    return len(os.path.commonprefix([list(r) for r in rows]))


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


def _attend(q, k, v, mask, scale):
    """(softmax attention output, log-sum-exp) of q (N, KV, L, D) over k/v (N, KV, S, D), fp32;
    ``mask`` bool broadcastable to (N, 1, L, S) or None."""
    if _FLASH is not None and q.device.type == "cpu":
        fm = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~mask, float("-inf"))
        o, lse = _FLASH(q, k, v, attn_mask=fm, scale=scale)
        return o.float(), lse.float()
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return _softmax_parts(s, v.float())


def merged_attention(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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


def _attention_forward(attn: Attention, pk: torch.Tensor, pv: torch.Tensor, x, cos, sin, mask, cache):
    """``Attention.forward`` with the shared prefix ``pk``/``pv`` in front of the cache."""
    B, T, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv, attn.head_dim
    q = rope(attn.q_proj(x).view(B, T, H, D), cos, sin)
    k = rope(attn.k_proj(x).view(B, T, KV, D), cos, sin)
    v = attn.v_proj(x).view(B, T, KV, D).transpose(1, 2)
    k, v = cache.update(attn.layer_idx, k, v)
    out = merged_attention(q, pk, pv, k, v, mask)
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@contextlib.contextmanager
def shared_prefix_attention(model, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """Within the block every attention layer of ``model`` attends to ``keys[layer]`` /
    ``values[layer]`` (KV, P, D) before its cache. Restores the layers afterwards."""
    mods = [layer.self_attn for layer in model.model.layers]
    for a in mods:
        a.forward = functools.partial(_attention_forward, a, keys[a.layer_idx], values[a.layer_idx])
    try:
        yield model
    finally:
        for a in mods:
            a.__dict__.pop("forward", None)


def _supported(model) -> bool:
    layers = getattr(getattr(model, "model", None), "layers", None)
    return bool(layers) and all(type(layer.self_attn) is Attention and "forward" not in layer.self_attn.__dict__
                                for layer in layers)


@torch.no_grad()
def _shared_prefix_batch(model, tokenizer, rows: list[list[int]], p: int, max_new_tokens: int,
                         stop: Sequence[str]) -> list[str]:
    dev = model.device
    B = len(rows)
    pad, eos = tokenizer.pad_id, tokenizer.eos_id
    eos = eos if eos is not None and eos >= 0 else None
    pre = model.new_cache(1, p)
    model(torch.tensor([rows[0][:p]], device=dev), cache=pre, num_logits=1, return_hidden=True)
    ids, mask = left_pad([r[p:] for r in rows], pad)
    width = ids.shape[1]
    with shared_prefix_attention(model, [k[0] for k in pre.keys], [v[0] for v in pre.values]):
        out = generate_ids(model, ids.to(dev), mask.to(dev), max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=pad, should_stop=stop_checker(tokenizer, stop),
                           cache=model.new_cache(B, width + max_new_tokens), position_offset=p)
    return [decode_new(tokenizer, out[r, width:].tolist(), eos, stop) for r in range(B)]


def generate_batched(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
                     batch_size: int = 16, share_prefix: bool = True, min_shared: int = 32) -> list[str]:
    """Greedy continuations (prompt excluded, cut at the first stop string) in input order.

    Prompts are sorted by length into batches; a batch whose rows share at least
    ``min_shared`` leading tokens prefills that prefix once and attends to one copy of its
    keys/values (``shared_prefix_attention``), the others use ``generate``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not share_prefix:
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size)
    enc = [tokenizer.encode(p, bos=True) for p in prompts]
    limit = model.config.max_position_embeddings - max_new_tokens
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]))
    results: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [enc[i] for i in idx]
        p = min(_lcp(rows), min(len(r) for r in rows) - 1)  # every row keeps >= 1 suffix token
        if len(idx) > 1 and p >= min_shared and max(len(r) for r in rows) <= limit and _supported(model):
            outs = _shared_prefix_batch(model, tokenizer, rows, p, max_new_tokens, stop)
        else:
            outs = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                            stop=stop, batch_size=len(idx))
        for i, o in zip(idx, outs):
            results[i] = o
    return results

"""Batched greedy generation for evaluation, with a shared prefix attended once.

Few-shot prompts (MUSE KnowMem) repeat the same in-context examples in every prompt: the
rows of a batch share a long token prefix. ``generate_batched`` prefills that prefix once
(batch 1) and keeps its keys/values as one copy, the shared prefix of the per-row cache
(``KVCache.prefix_keys``) that holds the suffixes (left padded) and the new tokens. The model's
own attention attends to both parts and merges the two softmax pieces
(``qru.kernels.prefix_attention``), so a decode step reads the prefix's keys/values once for the
whole batch instead of once per row -- the bulk of the step's memory traffic when the prefix is
long. Positions continue after the prefix.

Batches without a useful shared prefix, or with a prompt longer than the context allows,
go through ``qru.model.generate.generate`` unchanged. Results equal ``generate``'s up to
floating-point round-off (tested).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from qru.model.generate import decode_new, generate, generate_ids, left_pad, stop_checker
from qru.model.llama import Attention


def _lcp(rows: Sequence[Sequence[int]]) -> int:
    return len(os.path.commonprefix([list(r) for r in rows]))


def _supported(model) -> bool:
    layers = getattr(getattr(model, "model", None), "layers", None)
    return bool(layers) and all(type(layer.self_attn) is Attention for layer in layers)


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
    cache = model.new_cache(B, width + max_new_tokens)
    cache.prefix_keys, cache.prefix_values = [k[0] for k in pre.keys], [v[0] for v in pre.values]
    out = generate_ids(model, ids.to(dev), mask.to(dev), max_new_tokens=max_new_tokens, eos_token_id=eos,
                       pad_token_id=pad, should_stop=stop_checker(tokenizer, stop), cache=cache, position_offset=p)
    return [decode_new(tokenizer, out[r, width:].tolist(), eos, stop) for r in range(B)]


def generate_batched(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
                     batch_size: int = 16, share_prefix: bool = True, min_shared: int = 32) -> list[str]:
    """Greedy continuations (prompt excluded, cut at the first stop string) in input order.

    Prompts are sorted by length into batches; a batch whose rows share at least
    ``min_shared`` leading tokens prefills that prefix once and attends to one copy of its
    keys/values (the cache's shared prefix), the others use ``generate``.
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

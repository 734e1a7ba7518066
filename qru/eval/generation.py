"""Batched greedy generation for evaluation, with shared-prefix KV reuse.

Few-shot prompts (MUSE KnowMem) repeat the same in-context examples in every prompt: the
rows of a batch share a long token prefix. ``generate_batched`` prefills that prefix once
(batch 1), copies its keys/values into every row of the batch cache, then prefills only
the per-row suffixes (left padded between prefix and suffix; the attention mask and the
mask-derived positions skip the padding) and decodes greedily with the KV cache.

Batches without a useful shared prefix, or with a prompt longer than the context allows,
go through ``qru.model.generate.generate`` unchanged. Results equal ``generate``'s up to
floating-point round-off (tested).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from qru.model.generate import cut_at_stop, generate, generate_ids


def _lcp(rows: Sequence[Sequence[int]]) -> int:
    return len(os.path.commonprefix([list(r) for r in rows]))


@torch.no_grad()
def _shared_prefix_batch(model, tokenizer, rows: list[list[int]], p: int, max_new_tokens: int,
                         stop: Sequence[str]) -> list[str]:
    dev = model.device
    B = len(rows)
    suffix = [r[p:] for r in rows]
    width = max(len(s) for s in suffix)
    pad, eos = tokenizer.pad_id, tokenizer.eos_id
    cache = model.new_cache(B, p + width + max_new_tokens)
    pre = model.new_cache(1, p)
    model(torch.tensor([rows[0][:p]], device=dev), cache=pre, num_logits=1, return_hidden=True)
    for layer in range(len(cache.keys)):
        cache.keys[layer][:, :, :p] = pre.keys[layer]
        cache.values[layer][:, :, :p] = pre.values[layer]
    cache.seen = p
    del pre
    ids = torch.full((B, width), pad, dtype=torch.long)
    mask = torch.zeros((B, p + width), dtype=torch.long)
    mask[:, :p] = 1
    for r, s in enumerate(suffix):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, p + width - len(s):] = 1
    stopper = None
    if stop:
        def stopper(row, new_ids, _stop=tuple(stop)):
            text = tokenizer.decode(new_ids.tolist())
            return any(s in text for s in _stop)
    out = generate_ids(model, ids.to(dev), mask.to(dev), max_new_tokens=max_new_tokens,
                       eos_token_id=eos if eos is not None and eos >= 0 else None, pad_token_id=pad,
                       should_stop=stopper, cache=cache)
    texts = []
    for r in range(B):
        new = [t for t in out[r, width:].tolist() if t != pad]
        if eos in new:
            new = new[:new.index(eos)]
        texts.append(cut_at_stop(tokenizer.decode(new), stop))
    return texts


def generate_batched(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
                     batch_size: int = 16, share_prefix: bool = True, min_shared: int = 32) -> list[str]:
    """Greedy continuations (prompt excluded, cut at the first stop string) in input order.

    Prompts are sorted by length into batches; a batch whose rows share at least
    ``min_shared`` leading tokens reuses the prefix's KV cache, the others use ``generate``.
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
        if len(idx) > 1 and p >= min_shared and max(len(r) for r in rows) <= limit:
            outs = _shared_prefix_batch(model, tokenizer, rows, p, max_new_tokens, stop)
        else:
            outs = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                            stop=stop, batch_size=len(idx))
        for i, o in zip(idx, outs):
            results[i] = o
    return results

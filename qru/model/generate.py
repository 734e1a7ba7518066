"""Batched generation with a static KV cache: greedy or sampled (temperature, top-p), left
padding, early exit on EOS and on stop strings."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from qru.kernels.argmax import argmax


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). Top-p follows HF: keep the
    smallest set of most likely tokens whose probability mass reaches ``top_p``."""
    if not do_sample:
        return argmax(logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


CPU_ACTIVATION_BYTES = 4 << 20


def cpu_token_budget(config) -> int:
    """Tokens (rows x width) per CPU forward of a batch of whole sequences (prefill, scoring):
    the widest fp32 activation (tokens x max(intermediate, hidden)) stays near 4 MiB, between
    256 and 2048 tokens. Such forwards are compute-bound (larger batches save nothing), and past
    this size their operands fall out of cache and run slower per token; ``bench/bench_eval.py``
    shows batched PrivLeak scoring level with one text at a time for both of its models."""
    width = max(config.intermediate_size, config.hidden_size)
    return max(256, min(2048, CPU_ACTIVATION_BYTES // (4 * width)))


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True,
                 should_stop: Callable[[int, torch.Tensor], bool] | None = None,
                 cache=None, drop_finished: bool = True, position_offset: int = 0,
                 prefill_tokens: int | None | str = "auto", unpadded_prefill: bool = True) -> torch.Tensor:
    """Return (B, T + n) ids: the prompt followed by up to ``max_new_tokens`` new tokens.

    Rows that finished (EOS, or ``should_stop(row, new_ids)`` true) are filled with
    ``pad_token_id`` (default: the first EOS id, else 0). Without the cache every step
    re-runs the whole sequence (slow; used as the oracle in tests).

    With the cache: a batch without padding prefills on the plain causal path (no mask);
    finished rows leave the batch (``drop_finished``) once they are a quarter of it, so the
    rows still running stop paying for them. ``cache`` may hold a prefilled past (e.g. a
    shared prefix, ``cache.seen`` positions per row, room for ``T + max_new_tokens`` more);
    ``attention_mask`` then covers ``(B, cache.seen + T)``. ``position_offset`` shifts every
    position by that many tokens the model attends to outside ``cache`` (a prefix shared by
    all rows, see ``qru.eval.generation``). A prefill over more than ``prefill_tokens`` tokens
    (rows x width; "auto": 2048 on CPU, where larger GEMMs fall out of cache and run slower per
    token, unbounded elsewhere) runs in groups of rows into the same cache.

    ``unpadded_prefill``: a left-padded prompt batch prefills into an empty cache without its
    padding: the rows' prompts end to end in one forward row (the linears see all tokens in one
    GEMM), each on the plain causal path over its own tokens, written to its cache row behind the
    padding (:func:`_prefill_unpadded`): no compute on padding and causal attention at half the
    cost of a masked one; the numbers are those of the row alone.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = input_ids.shape
    dev = input_ids.device
    past = 0 if cache is None else cache.seen
    if (cache is not None or position_offset) and not use_cache:
        raise ValueError("a prefilled cache or a position offset needs use_cache=True")
    mask = torch.ones((B, past + T), dtype=torch.long, device=dev) if attention_mask is None \
        else attention_mask.to(dev).long()
    if mask.shape != (B, past + T):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != (batch, past+seq) = {(B, past + T)}")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
    out = input_ids.new_full((B, max_new_tokens), pad)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    n = 0
    if not use_cache:
        cur_mask = mask
        for step in range(max_new_tokens):
            full = torch.cat([input_ids, out[:, :step].clamp(min=0)], dim=1)
            logits = model(full, attention_mask=cur_mask, num_logits=1)[:, -1]
            nxt = sample_next(logits, do_sample, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out[:, step] = nxt
            n = step + 1
            if eos:
                done |= torch.isin(nxt, eos_t)
            if should_stop is not None:
                for r in (~done).nonzero().flatten().tolist():
                    if should_stop(r, out[r, :n]):
                        done[r] = True
            if bool(done.all()):
                break
            cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)[:, None]], dim=1)
        return torch.cat([input_ids, out[:, :n]], dim=1)

    if cache is None:
        cache = model.new_cache(B, T + max_new_tokens)
    if prefill_tokens == "auto":
        prefill_tokens = cpu_token_budget(model.config) if dev.type == "cpu" else None
    # The whole mask, preallocated: the new tokens' columns are ones.
    mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)
    padded = not bool(mask.all())
    live = torch.arange(B, device=dev)  # original row of each cache row
    finishing = bool(eos) or should_stop is not None  # else no row stops early: no bookkeeping
    ids = input_ids
    for step in range(max_new_tokens):
        past, seen = cache.seen, cache.seen + ids.shape[1]
        pos = None
        if position_offset:  # the model's own rule (real tokens counted), shifted
            pos = (mask[:, :seen].cumsum(-1) - 1).clamp(min=0)[:, past:] + position_offset if padded else \
                torch.arange(past, seen, device=dev).expand(len(ids), -1) + position_offset
        if padded and past == 0 and ids.shape[1] > 1 and unpadded_prefill:
            logits = _prefill_unpadded(model, ids, mask[:, :seen], cache, position_offset, prefill_tokens)
        else:
            logits = _forward_rows(model, ids, mask[:, :seen] if padded else None, pos, cache, prefill_tokens)
        nxt = sample_next(logits, do_sample, temperature, top_p, generator)
        n = step + 1
        if not finishing:
            out[:, step] = nxt
            ids = nxt[:, None]
            continue
        nxt = torch.where(done[live], torch.full_like(nxt, pad), nxt)
        out[live, step] = nxt
        if eos:
            done[live] |= torch.isin(nxt, eos_t)
        if should_stop is not None:
            for r in live[~done[live]].tolist():
                if should_stop(r, out[r, :n]):
                    done[r] = True
        if bool(done.all()):
            break
        keep = ~done[live]
        if drop_finished and int(keep.sum()) * 4 <= 3 * len(live):
            idx = keep.nonzero().flatten()
            cache.reorder(idx)
            live, nxt, mask = live[idx], nxt[idx], mask[idx]
            padded = not bool(mask.all())
        else:
            nxt = torch.where(keep, nxt, torch.zeros_like(nxt))  # finished rows feed a valid id
        ids = nxt[:, None]
    return torch.cat([input_ids, out[:, :n]], dim=1)


def _prefill_unpadded(model, ids, mask, cache, position_offset: int = 0, max_tokens: int | None = None) -> torch.Tensor:
    """Last-position logits (B, V) of a left-padded prompt batch into an empty ``cache``: each row
    unpadded on the causal path (no mask), its keys/values written at the cache positions behind
    its padding; the padded positions stay as they were (zeros) and are masked in later steps.
    Positions start at ``position_offset`` in every row. At most ``max_tokens`` tokens per
    forward (None: no limit).

    With the model's ``head`` (the lm_head apart): the rows' prompts run packed end to end in one
    forward row (:meth:`qru.model.llama.KVCache.packed_rows`: each attends only within itself), so
    the linears see all tokens in one GEMM; else rows of equal length run together."""
    B, T = ids.shape
    head = getattr(model, "head", None)
    lens = mask.sum(-1).tolist()
    if any(int(m[T - n:].sum()) != n for m, n in zip(mask, lens)):
        raise ValueError("unpadded prefill needs left padding: each row's ones at its end")
    for r, n in enumerate(lens):
        if n == 0:
            raise ValueError(f"row {r} of the prompt batch has no tokens")
    if head is not None:
        out_h = _prefill_packed(model, ids, lens, cache, position_offset, max_tokens)
    else:
        out_h = _prefill_by_length(model, ids, lens, cache, position_offset, max_tokens, head)
    cache.seen = T
    # one lm_head over all rows (its weight read once, not once per group)
    return head(out_h) if head else out_h


def _prefill_packed(model, ids, lens, cache, position_offset, max_tokens) -> torch.Tensor:
    """Final hidden states (B, hidden) at each row's last prompt token: groups of consecutive rows
    of at most ``max_tokens`` tokens (a longer row alone), each group's prompts end to end in one
    forward row."""
    B, T = ids.shape
    dev = ids.device
    groups, cur, size = [], [], 0
    for r, n in enumerate(lens):
        if cur and max_tokens is not None and size + n > max_tokens:
            groups.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += n
    groups.append(cur)
    out = [None] * B
    for rows in groups:
        segs, start = [], 0
        for r in rows:
            segs.append((r, start, lens[r], T - lens[r]))
            start += lens[r]
        flat = torch.cat([ids[r, T - lens[r]:] for r in rows])[None]
        pos = torch.cat([torch.arange(position_offset, position_offset + lens[r], device=dev) for r in rows])[None]
        hidden = model(flat, attention_mask=None, position_ids=pos, cache=cache.packed_rows(segs), return_hidden=True)
        last = hidden[0, torch.tensor([s + n - 1 for _, s, n, _ in segs], device=dev)]
        for i, r in enumerate(rows):
            out[r] = last[i]
    return torch.stack(out)


def _prefill_by_length(model, ids, lens, cache, position_offset, max_tokens, head) -> torch.Tensor:
    """Last-position hidden states (with ``head``) or logits (B, ...): rows of equal length
    together, each group a batch of unpadded rows."""
    B, T = ids.shape
    out = [None] * B
    for n in sorted(set(lens)):
        same = [r for r in range(B) if lens[r] == n]
        step = len(same) if max_tokens is None else max(1, max_tokens // n)
        for i0 in range(0, len(same), step):
            rows = same[i0:i0 + step]
            # consecutive rows: a slice gives views (no copies); others are gathered and put back
            sl = slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1 \
                else torch.tensor(rows, device=ids.device)
            part = cache.part(sl)
            view = part.part(start=T - n)
            pos = torch.arange(position_offset, position_offset + n, device=ids.device).expand(len(rows), -1)
            out_h = model(ids[sl, T - n:], attention_mask=None, position_ids=pos, cache=view, num_logits=1,
                          **({"return_hidden": True} if head else {}))[:, -1]
            if not isinstance(sl, slice):
                for layer in range(len(cache.keys)):
                    cache.keys[layer][sl] = part.keys[layer]
                    cache.values[layer][sl] = part.values[layer]
            for i, r in enumerate(rows):
                out[r] = out_h[i]
    return torch.stack(out)


def _forward_rows(model, ids, mask, pos, cache, max_tokens: int | None) -> torch.Tensor:
    """Last-position logits (B, V) of ``model(ids, ...)`` with ``cache``; rows in groups of at
    most ``max_tokens`` tokens, each writing its rows of the cache."""
    B, T = ids.shape
    rows = B if max_tokens is None else max(1, max_tokens // T)
    if rows >= B:
        return model(ids, attention_mask=mask, position_ids=pos, cache=cache, num_logits=1)[:, -1]
    past, out = cache.seen, []
    for r0 in range(0, B, rows):
        sl = slice(r0, r0 + rows)
        part = cache.part(sl, seen=past)
        out.append(model(ids[sl], attention_mask=None if mask is None else mask[sl],
                         position_ids=None if pos is None else pos[sl], cache=part, num_logits=1)[:, -1])
    cache.seen = past + T
    return torch.cat(out)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to the longest: ``(ids, attention_mask)``, both (B, width) int64."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
            mask[b, width - len(r):] = 1
    return ids, mask


def stop_checker(tokenizer, stop: Sequence[str]) -> Callable[[int, torch.Tensor], bool] | None:
    """``should_stop`` for :func:`generate_ids`: a row stops once its decoded new tokens contain a
    stop string (None without stop strings)."""
    if not stop:
        return None
    stop = tuple(stop)
    return lambda row, new_ids: any(s in tokenizer.decode(new_ids.tolist()) for s in stop)


def decode_new(tokenizer, new_ids: Sequence[int], eos: int | None, stop: Sequence[str]) -> str:
    """The text of one row's generated tokens: padding dropped, cut at EOS, then at a stop string."""
    new = [t for t in new_ids if t != tokenizer.pad_id]
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    return cut_at_stop(tokenizer.decode(new), stop)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
             stop: Sequence[str] = (), batch_size: int = 16, add_bos: bool = True,
             max_prompt_len: int | None = None, progress: bool = False, **sampling) -> list[str]:
    """Decoded continuations (prompt excluded) for each prompt, cut at the first stop string.

    Prompts are sorted by length so each batch pads little, then returned in input order.
    """
    if len(prompts) == 0:
        return []
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    encoded = [tokenizer.encode(p, bos=add_bos, eos=False) for p in prompts]
    limit = max_prompt_len or (model.config.max_position_embeddings - max_new_tokens)
    encoded = [e[-limit:] if limit > 0 else e for e in encoded]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[str] = [""] * len(prompts)
    eos = sampling.pop("eos_token_id", tokenizer.eos_id)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    dev = model.device
    for start in batches:
        idx = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_id)
        width = ids.shape[1]
        out = generate_ids(model, ids.to(dev), mask.to(dev), max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_id, should_stop=stop_checker(tokenizer, stop), **sampling)
        for r, i in enumerate(idx):
            results[i] = decode_new(tokenizer, out[r, width:].tolist(), eos, stop)
    return results

"""Shared evaluation machinery: data loading (through :mod:`qru.data`), ROUGE-L, batched per-token
log-probs (``score_sequences``) and the membership scores derived from them.

Membership scores follow the MUSE reference (``metrics/privleak.py``): every score is
oriented so that LOWER means "more likely a training member":

- ``PPL``      mean token NLL (the reference's ``loss``; its name is historical),
- ``PPL/zlib`` mean token NLL / zlib-compressed byte length of the text,
- ``Min-k%``   -mean of the lowest k% token log-probs (Shi et al., 2024),
- ``Min-k%++`` -mean of the lowest k% of ``(log p(x_t) - mu_t) / sigma_t`` where
  ``mu_t = E_p[log p]`` and ``sigma_t^2 = E_p[(log p)^2] - mu_t^2`` over the next-token
  distribution (Zhang et al., 2024).

The number of tokens kept is ``max(1, int(n * k))`` (the reference's ``int(n * k)`` would
average an empty set for texts shorter than ``1/k`` tokens).
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from qru.data import DataError
from qru.kernels.token_stats import token_stats as kernel_token_stats
from qru.model.generate import cpu_token_budget


def take(items: list, limit: int | None) -> list:
    """The first ``limit`` items (all when None)."""
    if limit is None:
        return items
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return items[:limit]


# -- ROUGE ----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(reference: str, prediction: str, use_stemmer: bool = False) -> tuple[float, float]:
    """ROUGE-L ``(F1, recall)`` of ``prediction`` against ``reference`` (rouge-score package)."""
    s = _scorer(use_stemmer).score(reference, prediction)["rougeL"]
    return float(s.fmeasure), float(s.recall)


# -- scoring --------------------------------------------------------------------------------

@dataclass
class SequenceScore:
    """Per-token log-probs of the scored tokens of one sequence (and Min-K%++ z-scores)."""
    logprobs: np.ndarray
    zscores: np.ndarray | None = None
    n_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_tokens = int(self.logprobs.shape[0])

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per scored token."""
        return float(-self.logprobs.mean()) if self.n_tokens else float("nan")

    def min_k(self, k: float) -> float:
        return min_k(self.logprobs, k)

    def min_k_pp(self, k: float) -> float:
        if self.zscores is None:
            raise ValueError("Min-K%++ needs zscores: score with stats=True")
        return min_k(self.zscores, k)


def min_k(values: np.ndarray | Sequence[float], k: float) -> float:
    """``-mean`` of the ``max(1, int(n*k))`` smallest values (MUSE's ``Min-k%``)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        raise ValueError("Min-K% of an empty sequence (no scored tokens)")
    m = max(1, int(v.size * k))
    return float(-v[:m].mean())


def zlib_length(text: str) -> int:
    """Byte length of the zlib-compressed UTF-8 text (the reference's 'zlib entropy')."""
    return len(zlib.compress(text.encode("utf-8")))


def token_stats(logits: torch.Tensor, targets: torch.Tensor, stats: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each target under ``logits`` (T, V) in fp32, and its Min-K%++ z-score.

    z_t = (log p(x_t) - mu_t) / sigma_t, mu_t = sum_v p_v log p_v,
    sigma_t^2 = sum_v p_v (log p_v - mu_t)^2 (floored at 1e-12 so a flat distribution stays finite);
    computed by :func:`qru.kernels.token_stats.token_stats` without (T, V) temporaries.
    """
    lp, mu, var = kernel_token_stats(logits, targets)
    if not stats:
        return lp, None
    return lp, (lp - mu) / var.clamp_min(1e-12).sqrt()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _batches(order: list[int], lengths: Sequence[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Consecutive groups of ``order`` with at most ``batch_size`` rows and, when given, at
    most ``max_tokens`` padded tokens (rows x longest row); a single row always fits."""
    out, cur, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if cur and (len(cur) == batch_size or (max_tokens is not None and w * (len(cur) + 1) > max_tokens)):
            out.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


def _right_padded(seqs: Sequence[Sequence[int]], width: int, pad_id: int) -> torch.Tensor:
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for r, q in enumerate(seqs):
        ids[r, :len(q)] = torch.tensor(q, dtype=torch.long)
    return ids


def _prefix_forward(model, rows: Sequence[Sequence[int]], idx: list[int], plen: Sequence[int], pad_id: int
                    ) -> torch.Tensor:
    """Hidden states (len(idx), W, H) of ``rows[i][plen[i]:]`` after their prefix ``rows[i][:plen[i]]``.

    Each distinct prefix of the batch runs once (right padded, causal); its keys/values are
    copied into the cache rows of every row that starts with it, then the suffixes run on
    top (right padded; a mask hides the padding between a shorter prefix and its suffix, and
    the mask-derived positions continue each row's prefix).
    """
    dev = model.device
    heads: dict[tuple, int] = {}
    for i in idx:
        heads.setdefault(tuple(rows[i][:plen[i]]), len(heads))
    prefixes = list(heads)
    P = max(len(q) for q in prefixes)
    pre = model.new_cache(len(prefixes), P)
    model(_right_padded(prefixes, P, pad_id).to(dev), cache=pre, num_logits=1, return_hidden=True)
    suffixes = [rows[i][plen[i]:] for i in idx]
    W = max(len(q) for q in suffixes)
    cache = model.new_cache(len(idx), P + W)
    g = torch.tensor([heads[tuple(rows[i][:plen[i]])] for i in idx], device=dev)
    for layer in range(len(cache.keys)):
        cache.keys[layer][:, :, :P] = pre.keys[layer].index_select(0, g)
        cache.values[layer][:, :, :P] = pre.values[layer].index_select(0, g)
    cache.seen = P
    del pre
    mask = None
    if any(plen[i] != P for i in idx):
        mask = torch.zeros((len(idx), P + W), dtype=torch.long)
        for r, (i, q) in enumerate(zip(idx, suffixes)):
            mask[r, :plen[i]] = 1
            mask[r, P:P + len(q)] = 1
        mask = mask.to(dev)
    return model(_right_padded(suffixes, W, pad_id).to(dev), attention_mask=mask, cache=cache, return_hidden=True)


@torch.no_grad()
def score_ids(model, rows: Sequence[Sequence[int]], starts: Sequence[int], batch_size: int = 8,
              pad_id: int = 0, stats: bool = True, max_batch_tokens: int | None | str = "auto",
              share_prefix: bool = True, min_shared: int = 16) -> list[SequenceScore]:
    """Score tokens ``rows[i][starts[i]:]`` (each given its prefix) in right-padded batches.

    One forward per batch (rows sorted by length so batches pad little); the LM head and an
    fp32 log-softmax run per row over the scored positions only, so memory is O(T*V) per row.
    Right padding needs no attention mask: under causal attention no real token sees the
    padding after it, so batches take the plain causal path. A batch holds at most
    ``batch_size`` rows and ``max_batch_tokens`` padded tokens ("auto": on CPU
    :func:`qru.model.generate.cpu_token_budget`, unbounded on GPU).

    With ``share_prefix``, rows whose unscored part (all but its last token,
    ``rows[i][:starts[i] - 1]``) is the same sequence of at least ``min_shared`` tokens --
    e.g. TOFU's answers to one question -- are batched together and that prompt runs once
    per batch (``_prefix_forward``); the results equal the unshared ones up to float round-off.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(rows) != len(starts):
        raise ValueError(f"rows ({len(rows)}) and starts ({len(starts)}) differ in length")
    for i, (r, s) in enumerate(zip(rows, starts)):
        if not 1 <= s <= len(r):
            raise ValueError(f"sequence {i}: start {s} out of range for {len(r)} tokens (need 1 <= start <= len)")
    out: list[SequenceScore | None] = [None] * len(rows)
    dev = model.device
    if max_batch_tokens == "auto":
        max_batch_tokens = cpu_token_budget(model.config) if dev.type == "cpu" else None
    plen = [0] * len(rows)  # tokens of row i computed by a shared prefix pass
    if share_prefix and batch_size > 1:
        groups: dict[tuple, list[int]] = {}
        for i, (r, s) in enumerate(zip(rows, starts)):
            if s - 1 >= min_shared:
                groups.setdefault(tuple(r[:s - 1]), []).append(i)
        for idx in groups.values():
            if len(idx) > 1:
                for i in idx:
                    plen[i] = starts[i] - 1
    lengths = [len(r) - p for r, p in zip(rows, plen)]
    plain = sorted((i for i in range(len(rows)) if not plen[i]), key=lambda i: -lengths[i])
    # Shared rows: group by group (longest suffix first), so a batch holds few distinct prefixes.
    shared: dict[tuple, list[int]] = {}
    for i in sorted((i for i in range(len(rows)) if plen[i]), key=lambda i: -lengths[i]):
        shared.setdefault(tuple(rows[i][:plen[i]]), []).append(i)
    batches = [(b, False) for b in _batches(plain, lengths, batch_size, max_batch_tokens)]
    batches += [(b, True) for b in _batches([i for g in shared.values() for i in g], lengths, batch_size,
                                            max_batch_tokens)]
    for idx, is_shared in batches:
        if is_shared:
            hidden = _prefix_forward(model, rows, idx, plen, pad_id)
        else:
            ids = _right_padded([rows[i] for i in idx], max(lengths[i] for i in idx), pad_id)
            hidden = model(ids.to(dev), return_hidden=True)
        for r, i in enumerate(idx):
            n, s, p = len(rows[i]), starts[i], plen[i]
            if s == n:
                out[i] = SequenceScore(np.zeros(0), np.zeros(0) if stats else None)
                continue
            logits = model.lm_head(hidden[r, s - 1 - p:n - 1 - p])
            targets = torch.tensor(rows[i][s:n], dtype=torch.long, device=dev)
            lp, z = token_stats(logits, targets, stats=stats)
            out[i] = SequenceScore(lp.double().cpu().numpy(), None if z is None else z.double().cpu().numpy())
    return out  # type: ignore[return-value]


def score_sequences(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_len: int | None = None,
                    prompts: Sequence[str] | None = None, stats: bool = True) -> list[SequenceScore]:
    """Per-token log-probs of each text (BOS prepended, first ``max_len`` tokens kept).

    Without ``prompts`` every token after BOS is scored. With ``prompts`` (``texts[i]`` must
    start with ``prompts[i]``) only the tokens of ``texts[i]`` past the longest common token
    prefix with ``prompts[i]`` are scored, so a token straddling the boundary counts as answer.
    ``max_len`` defaults to the model's ``max_position_embeddings``.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, not a str")
    limit = max_len or model.config.max_position_embeddings
    rows, starts = [], []
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t, bos=True)[:limit]
        if prompts is None:
            start = 1
        else:
            p = prompts[i]
            if not t.startswith(p):
                raise ValueError(f"text {i} does not start with its prompt")
            start = max(1, _common_prefix(tokenizer.encode(p, bos=True), ids))
        if start >= len(ids):
            raise DataError(f"text {i} has no tokens to score ({len(ids)} tokens, scoring from {start}"
                                f"{', after truncation to max_len=%d' % limit if len(ids) == limit else ''})")
        rows.append(ids)
        starts.append(start)
    return score_ids(model, rows, starts, batch_size=batch_size, pad_id=tokenizer.pad_id, stats=stats)


def membership_scores(score: SequenceScore, text: str, k: float = 0.4) -> dict[str, float]:
    """MUSE-oriented scores (lower = more member-like) for one scored text."""
    pct = int(round(k * 100))
    out = {"PPL": score.loss, "PPL/zlib": score.loss / zlib_length(text), f"Min-{pct}%": score.min_k(k)}
    if score.zscores is not None:
        out[f"Min-{pct}%++"] = score.min_k_pp(k)
    out["n_tokens"] = score.n_tokens
    return out


def auc_forget_holdout(forget: Sequence[float], holdout: Sequence[float]) -> float:
    """ROC AUC as MUSE computes ``forget_holdout_<score>``: forget labelled 0, holdout 1, and
    the classifier score is ``-score`` (scores are lower for members).

    So AUC = P(holdout looks more member-like than forget). A model that memorised the forget
    set gives AUC near 0; a model that never saw it gives about AUC_retrain (about 0.5).
    """
    from sklearn.metrics import roc_auc_score

    if len(forget) == 0 or len(holdout) == 0:
        raise ValueError(f"AUC needs both sets non-empty (forget={len(forget)}, holdout={len(holdout)})")
    y = np.r_[np.zeros(len(forget)), np.ones(len(holdout))]
    s = -np.r_[np.asarray(forget, dtype=np.float64), np.asarray(holdout, dtype=np.float64)]
    if not np.all(np.isfinite(s)):
        raise ValueError("membership scores contain NaN/inf")
    return float(roc_auc_score(y, s))


# -- throughput -----------------------------------------------------------------------------

class Meter:
    """Counts tokens processed and wall time per named stage."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, tokens: int, seconds: float) -> None:
        self.tokens[stage] = self.tokens.get(stage, 0) + int(tokens)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + float(seconds)

    def timer(self, stage: str):
        meter = self

        class _T:
            tokens = 0

            def __enter__(self):
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                if exc[0] is None:
                    meter.add(stage, self.tokens, time.perf_counter() - self.t0)
                return False

        return _T()

    def summary(self) -> dict:
        tot_t, tot_s = sum(self.tokens.values()), sum(self.seconds.values())
        per = {k: {"tokens": self.tokens[k], "seconds": round(self.seconds[k], 4),
                   "tokens_per_s": _rate(self.tokens[k], self.seconds[k])} for k in self.tokens}
        return {"tokens": tot_t, "seconds": round(tot_s, 4), "tokens_per_s": _rate(tot_t, tot_s), "stages": per}


def _rate(tokens: int, seconds: float) -> float:
    return float(tokens / seconds) if seconds > 0 else float("nan")


def nan_to_none(x):
    """JSON-safe floats: NaN/inf become None (recursively through dicts and lists)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    if isinstance(x, np.floating):
        return nan_to_none(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return x

"""Unlearning losses as small pure functions on per-token / per-sequence log-probabilities.

Conventions: ``token_logprobs`` turns logits into fp32 per-token log-probs (zero where
masked); ``sequence_logprobs`` shifts for next-token prediction and returns per-sequence
sums and token counts; ``hidden_sequence_logprobs`` does the same from the final hidden states
and the output weight, never forming the (B, T, V) logits. Every loss below takes those sums/counts (or logits for KLR), so it
can be checked by hand on tiny tensors. All losses are minimised.

- ``ga``      gradient ascent: -NLL on the forget set (token mean).
- ``npo``     -(2/β)·E log σ(-β·(log p_θ(y|x) - log p_ref(y|x))), sequence log-probs (sums).
- ``simnpo``  -(2/β)·E log σ(-β·log p_θ(y|x)/|y| - δ): reference-free, length-normalised.
- ``gdr``     NLL on the retain set (token mean).
- ``klr``     KL(p_ref ‖ p_θ) over the retain tokens (mean per token).
- ``combine`` γ·forget + α·retain.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qru.kernels.linear_logprobs import IGNORE_INDEX, linear_logprobs

NPO_BETA = 0.1
SIMNPO_BETA = 2.5
SIMNPO_DELTA = 0.0


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(labels[b,t] | ·) from ``logits[b,t]``, in fp32; 0 where ``mask`` is 0.

    ``logits`` (B, T, V) and ``labels``/``mask`` (B, T) are already aligned (no shift here).
    Computed as log_softmax + gather (fused through ``cross_entropy``) in fp32.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits (B,T,V) {tuple(logits.shape)} and labels (B,T) {tuple(labels.shape)} disagree")
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
    B, T, V = logits.shape
    tgt = labels.long()
    if mask is not None:
        tgt = tgt.masked_fill(~mask.bool(), -100)
    nll = F.cross_entropy(logits.float().reshape(B * T, V), tgt.reshape(B * T), ignore_index=-100,
                          reduction="none")
    return -nll.view(B, T)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``(sum of log p, token count)`` for next-token prediction, both (B,) fp32.

    ``loss_mask[b, t] = 1`` makes token ``input_ids[b, t]`` a target (predicted by ``logits[b, t-1]``);
    position 0 is never a target.
    """
    mask = loss_mask[:, 1:]
    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:], mask)
    return lp.sum(-1), mask.sum(-1).float()


def hidden_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                             loss_mask: torch.Tensor, chunk_size: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logprobs(hidden @ weightᵀ, input_ids, loss_mask)`` without the (B, T, V) logits.

    ``hidden`` (B, T, H) are the final (normed) hidden states and ``weight`` (V, H) the output
    projection. Only the target positions go through the fused, chunked projection + log-softmax
    (:func:`qru.kernels.linear_logprobs.linear_logprobs`); the per-sequence sums are scattered back.
    """
    if hidden.dim() != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"hidden (B,T,H) {tuple(hidden.shape)} and input_ids (B,T) {tuple(input_ids.shape)} "
                         "disagree")
    if loss_mask.shape != input_ids.shape:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    mask = loss_mask[:, 1:].bool()
    rows, cols = mask.nonzero(as_tuple=True)
    counts = mask.sum(-1)
    h, y = hidden[:, :-1][rows, cols], input_ids[:, 1:][rows, cols]
    n = h.shape[0]
    pad = padded_rows(n) - n
    if pad:  # ignored rows in a group of their own: a bounded set of GEMM shapes (see padded_rows)
        h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        y = torch.cat([y, y.new_full((pad,), IGNORE_INDEX)])
        counts_g = torch.cat([counts, counts.new_full((1,), pad)])
    else:
        counts_g = counts
    lp = linear_logprobs(h, weight, y, chunk_size=chunk_size, ignore_index=IGNORE_INDEX,
                         group_sizes=counts_g)  # rows come sequence by sequence; the sums below are per sequence
    sums = torch.zeros(input_ids.shape[0], device=lp.device, dtype=torch.float32).index_add(0, rows, lp[:n])
    return sums, counts.float()


def padded_rows(n: int) -> int:
    """``n`` rounded up to a bucket: a multiple of 64, or of a quarter of the power of two at or
    below ``n`` when that is larger (fewer than 64 or 25 % extra rows). The number of target tokens of a batch varies from
    step to step; every new GEMM row count makes oneDNN (CPU bf16 / fp32 GEMMs) build and cache
    new primitives, about 0.7 MB each, in caches of 1024 entries, so unbucketed row counts grew
    the process by over a GB during training."""
    if n <= 0:
        return n
    step = max(64, (1 << (n.bit_length() - 1)) // 4)
    return -(-n // step) * step


def mean_nll(logp_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood over the whole batch."""
    total = count.sum()
    if total <= 0:
        raise ValueError("mean_nll: the batch has no target tokens (all loss-mask entries are 0)")
    return -logp_sum.sum() / total


def ga(logp_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: minimise -NLL (token mean) on the forget set."""
    return -mean_nll(logp_sum, count)


def npo(logp_sum: torch.Tensor, ref_logp_sum: torch.Tensor, beta: float = NPO_BETA) -> torch.Tensor:
    """Negative preference optimisation on sequence log-probs (sums over target tokens).

    Equals (2/β)·log 2 when θ = ref, decreases towards 0 as log p_θ → -∞ (bounded, unlike GA),
    and its gradient tends to GA's (on sequence sums) as β → 0.
    """
    _check_beta(beta)
    if logp_sum.shape != ref_logp_sum.shape:
        raise ValueError(f"npo: logp_sum {tuple(logp_sum.shape)} and ref_logp_sum {tuple(ref_logp_sum.shape)} differ")
    log_ratio = logp_sum.float() - ref_logp_sum.float()
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def simnpo(logp_sum: torch.Tensor, count: torch.Tensor, beta: float = SIMNPO_BETA,
           delta: float = SIMNPO_DELTA) -> torch.Tensor:
    """SimNPO: NPO with the reference replaced by length normalisation and a margin δ."""
    _check_beta(beta)
    if (count <= 0).any():
        raise ValueError("simnpo: a sequence has no target tokens (count 0)")
    avg = logp_sum.float() / count.float()
    return -(2.0 / beta) * F.logsigmoid(-beta * avg - delta).mean()


def gdr(logp_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Gradient-descent retain regulariser: NLL (token mean) on the retain set."""
    return mean_nll(logp_sum, count)


def klr(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) per token, averaged over positions where ``mask`` is 1.

    ``logits``/``ref_logits`` (B, T, V) and ``mask`` (B, T) are aligned; the caller chooses
    which positions count (for next-token prediction: ``loss_mask[:, 1:]`` against ``logits[:, :-1]``).
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"klr: logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    if mask.shape != logits.shape[:2]:
        raise ValueError(f"klr: mask {tuple(mask.shape)} does not match logits (B,T) {tuple(logits.shape[:2])}")
    m = mask.bool()
    n = m.sum()
    if n == 0:
        raise ValueError("klr: no retain tokens selected (mask is all 0)")
    lp = logits[m].float().log_softmax(-1)
    lq = ref_logits[m].float().log_softmax(-1)
    return (lq.exp() * (lq - lp)).sum() / n


def combine(forget: torch.Tensor | None, retain: torch.Tensor | None, gamma: float = 1.0,
            alpha: float = 1.0) -> torch.Tensor:
    """γ·forget + α·retain (either term may be absent)."""
    terms = []
    if forget is not None:
        terms.append(gamma * forget)
    if retain is not None:
        terms.append(alpha * retain)
    if not terms:
        raise ValueError("combine: both forget and retain losses are None")
    return sum(terms[1:], terms[0])

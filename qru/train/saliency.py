"""A SURE-style saliency mask for full fine-tuning (``qru unlearn --saliency-mask TOPK``).

Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization" (ICLR 2025,
arXiv:2410.16454), propose SURE: unlearn with a large learning rate, but update only the modules
whose forget-loss gradient is large (a module-level saliency map), so the update is big enough to
survive quantization while the utility the other modules carry is left alone. Here: one pass over
the forget set accumulates the gradient of the method's forget term at the starting weights
(:func:`module_grad_norms`), the ``TOPK`` modules with the largest gradient norm are kept
(:func:`top_modules`) and every other parameter is frozen (:func:`restrict_to`).

A *module* is a module that owns trainable parameters directly (a linear, an embedding, a norm);
its gradient norm is the L2 norm over all of them (``sqrt(Σ ||∇p||²)``, fp32).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules that own trainable parameters directly, in module order."""
    return [(n, m) for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def module_grad_norms(model: nn.Module, loss_fn: Callable[[object], torch.Tensor], batches: Iterable
                      ) -> dict[str, float]:
    """``{module name: ||∇ Σ_b loss_fn(b)||}`` over :func:`candidate_modules`: the gradient of the
    summed loss (weight each batch's loss in ``loss_fn`` to get a mean), accumulated over one pass
    of ``batches``. The parameters' ``.grad`` are left as they were."""
    mods = candidate_modules(model)
    if not mods:
        raise ValueError("saliency mask: the model has no trainable parameters")
    params = [p for _, m in mods for p in m.parameters(recurse=False) if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        n = 0
        for b in batches:
            loss = loss_fn(b)
            if not bool(torch.isfinite(loss.detach())):
                raise ValueError(f"saliency mask: the forget loss of batch {n} is {float(loss)}")
            loss.backward()
            n += 1
        if n == 0:
            raise ValueError("saliency mask: no forget batch")
        out = {}
        for name, m in mods:
            sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in m.parameters(recurse=False)
                     if p.requires_grad and p.grad is not None)
            out[name] = math.sqrt(sq)
        return out
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def top_modules(norms: dict[str, float], k: int) -> list[str]:
    """The ``k`` names with the largest norm, largest first (ties: the earlier module first)."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"--saliency-mask must be a positive number of modules, got {k!r}")
    if k > len(norms):
        raise ValueError(f"--saliency-mask {k}: only {len(norms)} trainable modules")
    order = {n: i for i, n in enumerate(norms)}
    return sorted(norms, key=lambda n: (-norms[n], order[n]))[:k]


def restrict_to(model: nn.Module, modules: Iterable[str]) -> list[str]:
    """Freeze every parameter not owned directly by one of ``modules`` (a tied tensor stays trainable
    if any of its owners is kept); returns the names of the parameters that still train."""
    keep = set(modules)
    known = {n for n, _ in model.named_modules()}
    missing = sorted(keep - known)
    if missing:
        raise ValueError(f"saliency mask: no module {missing[0]!r} in the model")
    kept = {id(p) for mname, m in model.named_modules() if mname in keep for p in m.parameters(recurse=False)}
    for p in model.parameters():  # a tied tensor trains if any module that owns it is kept
        if id(p) not in kept:
            p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


__all__ = ["candidate_modules", "module_grad_norms", "top_modules", "restrict_to"]

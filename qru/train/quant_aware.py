"""Quantization-aware unlearning helpers (pure functions; nothing replaces a module's ``forward``).

The targets are the linears ``qru quantize`` quantizes at export: every plain ``nn.Linear`` and
every :class:`~qru.model.lora.LoRALinear` whose name no ``skip`` entry matches
(:func:`qru.quant.qlinear.is_skipped`; default ``("lm_head",)``, as ``qru quantize --skip``), with
the format's export block size (:func:`qru.quant.qlinear.resolve_block_size`).

* :func:`fake_quant_targets` / :func:`fake_quant_params`: each target's ``W_q = D(Q(W_eff))``,
  differentiable by the straight-through estimator (:mod:`qru.kernels.fake_quant`), ``W_eff = W``
  (full mode) or ``W + s·B·A`` merged blockwise (LoRA mode). The quantized forward gives the
  targets a weight transform returning ``W_q`` (:func:`qru.model.linear.set_weight_transform`, the
  layers' own seam; the adapter is inside ``W_q``); in full mode
  ``torch.func.functional_call(model, fake_quant_params(...), args)`` also works. See
  docs/quant_aware.md.
* :func:`snapshot`, :func:`code_flip_frac`: monitoring, the share of the targets' codes that the
  update has changed so far, per format (:func:`qru.quant.survival.code_flips`).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

from qru.kernels.fake_quant import FAKE_QUANT_FORMATS, fake_quant, fake_quant_lora
from qru.model.lora import LoRALinear, merge_weight
from qru.quant import quantize
from qru.quant.qlinear import is_skipped, resolve_block_size
from qru.quant.survival import code_flips

DEFAULT_SKIP = ("lm_head",)


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    """``"nf4,int4"`` or a sequence -> a list of distinct fake-quantizable formats (ValueError naming
    the bad one)."""
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    if not names:
        raise ValueError("--quant-aware needs at least one format")
    for f in names:
        if f not in FAKE_QUANT_FORMATS:
            raise ValueError(f"--quant-aware: unknown format {f!r} (known: {', '.join(FAKE_QUANT_FORMATS)})")
    return list(dict.fromkeys(names))


def quant_targets(model: nn.Module, skip=DEFAULT_SKIP) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linears quantized at export (``nn.Linear``, qru's ``Linear`` included, or
    ``LoRALinear``), in module order. A QLoRA (NF4) base raises: its weight is already quantized."""
    skip = tuple(s.strip() for s in skip.split(",") if s.strip()) if isinstance(skip, str) else tuple(skip or ())
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, nn.Linear)):
            if is_skipped(name, skip):
                continue
            if isinstance(m, LoRALinear) and m.is_nf4:
                raise ValueError(f"{name}: quantization-aware training needs a dense base weight, not NF4 (QLoRA)")
            out.append((name, m))
    return out


def fake_quant_weight(module: nn.Module, fmt: str, block_size: int | None = None, name: str = "weight"
                      ) -> torch.Tensor:
    """The differentiable fake-quantized effective weight of one target (STE gradients to the
    trainable tensors: ``weight`` in full mode, ``lora_A`` / ``lora_B`` in LoRA mode)."""
    bs = resolve_block_size(fmt, block_size)
    if isinstance(module, LoRALinear):
        if module.disabled:
            return fake_quant(module.weight, fmt, bs, name=name)
        return fake_quant_lora(module.weight, module.lora_A, module.lora_B, module.scaling, fmt, bs, name=name)
    return fake_quant(module.weight, fmt, bs, name=name)


def fake_quant_targets(model: nn.Module, fmt: str, block_size: int | None = None, skip=DEFAULT_SKIP
                       ) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, differentiable ``W_q``) for every target, in module order."""
    return [(n, m, fake_quant_weight(m, fmt, block_size, name=f"{n}.weight")) for n, m in quant_targets(model, skip)]


def fake_quant_params(model: nn.Module, fmt: str, block_size: int | None = None, skip=DEFAULT_SKIP
                      ) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": W_q}`` for every target, for ``torch.func.functional_call`` (full mode)."""
    return {f"{n}.weight": w for n, _, w in fake_quant_targets(model, fmt, block_size, skip)}


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight that export quantizes: ``W`` as stored, or (LoRA) the fp32 merge ``W + s·B·A``."""
    if isinstance(module, LoRALinear):
        w = module.weight.detach().float()
        return w if module.disabled else merge_weight(w, module.lora_A, module.lora_B, module.scaling)
    return module.weight.detach()


@torch.no_grad()
def snapshot(model: nn.Module, skip=DEFAULT_SKIP) -> dict[str, torch.Tensor]:
    """Clones of the targets' effective weights (the base for :func:`code_flip_frac`; take it
    before the first step; in LoRA mode with ``B = 0`` it equals the frozen base)."""
    return {n: effective_weight(m).clone() for n, m in quant_targets(model, skip)}


@torch.no_grad()
def layer_code_flips(base: torch.Tensor, current: torch.Tensor, fmt: str, block_size: int | None = None) -> int:
    """How many elements' codes differ between ``Q(base)`` and ``Q(current)`` (same shape)."""
    if base.shape != current.shape:
        raise ValueError(f"code flips: base {tuple(base.shape)} and current {tuple(current.shape)} differ in shape")
    bs = resolve_block_size(fmt, block_size)
    return code_flips(quantize(base, fmt, bs), quantize(current, fmt, bs))


@torch.no_grad()
def code_flip_frac(base: Mapping[str, torch.Tensor], model: nn.Module, formats: Iterable[str],
                   block_size: int | None = None, skip=DEFAULT_SKIP) -> dict[str, float]:
    """Per format, the share of the targets' codes changed between ``base`` (a :func:`snapshot`) and
    the model's current effective weights: ``Σ flips / Σ numel`` over the targets."""
    targets = quant_targets(model, skip)
    missing = [n for n, _ in targets if n not in base]
    if missing:
        raise ValueError(f"code_flip_frac: the base snapshot lacks {missing[0]!r} ({len(missing)} targets missing)")
    out = {}
    for fmt in parse_formats(formats):
        flips = total = 0
        for n, m in targets:
            cur = effective_weight(m)
            flips += layer_code_flips(base[n].to(cur.dtype), cur, fmt, block_size)
            total += math.prod(cur.shape)
        out[fmt] = flips / total if total else 0.0
    return out

"""Quantization-aware unlearning: the model-side seam and helpers (nothing replaces a module's ``forward``).

The targets are the linears ``qru quantize`` quantizes at export: every plain ``nn.Linear`` and
every :class:`~qru.model.lora.LoRALinear` whose name no ``skip`` entry matches
(:func:`qru.quant.qlinear.is_skipped`; default ``("lm_head",)``, as ``qru quantize --skip``), with
the format's export block size (:func:`qru.quant.qlinear.resolve_block_size`).

* The seam: :func:`attach` registers a :class:`FakeQuantWeight` parametrization
  (``torch.nn.utils.parametrize``) on each plain target's ``weight``; it is the identity until
  :func:`fake_quantized` (a context) sets a format, and then returns ``D(Q(W))`` with the
  straight-through gradient (:func:`qru.kernels.fake_quant.fake_quant`), so the module's own
  forward reads the fake-quantized weight. A ``LoRALinear`` target needs no parametrization: the
  context sets its explicit ``fake_quant`` state and its forward uses
  ``fake_quant_lora(W, A, B, s)``. :func:`detach` (or leaving :func:`attached`) removes the
  parametrizations and puts the same ``Parameter`` objects back as plain weights, so
  checkpoints, merge and export see plain weights; :func:`plain_name` maps a parametrized
  parameter name (``….parametrizations.weight.original``) back to ``….weight``.
* :func:`quant_aware_step`: wraps the loop's step function into ``L(full precision) + λ·L(quantized)``
  (the method's forget term and its regularizer alike), one random format per step or the sum.
* :func:`fake_quant_targets` / :func:`fake_quant_params`: each target's ``W_q = D(Q(W_eff))`` as
  tensors (``torch.func.functional_call`` in full mode).
* :func:`snapshot`, :func:`code_flip_frac`: monitoring, the share of the targets' codes that the
  update has changed so far, per format (:func:`qru.quant.survival.code_flips`).
"""
from __future__ import annotations

import contextlib
import math
import re
import weakref
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from qru.kernels import fake_quant as _fq
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


def parse_skip(skip) -> tuple[str, ...]:
    """``"lm_head,mlp"`` or a sequence -> a tuple of skip entries (``""``: none)."""
    return tuple(s.strip() for s in skip.split(",") if s.strip()) if isinstance(skip, str) else tuple(skip or ())


def _is_plain_linear(m: nn.Module) -> bool:
    """A plain ``nn.Linear``, also while it carries a parametrization (whose class derives from it)."""
    return type(m) is nn.Linear or (parametrize.is_parametrized(m) and type(m).__bases__ == (nn.Linear,))


def quant_targets(model: nn.Module, skip=DEFAULT_SKIP) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linears quantized at export (plain ``nn.Linear`` or ``LoRALinear``), in
    module order. A QLoRA (NF4) base raises: its weight is already quantized."""
    skip = parse_skip(skip)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) or _is_plain_linear(m):
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
    return fake_quant(raw_weight(module), fmt, bs, name=name)


def fake_quant_targets(model: nn.Module, fmt: str, block_size: int | None = None, skip=DEFAULT_SKIP
                       ) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, differentiable ``W_q``) for every target, in module order."""
    return [(n, m, fake_quant_weight(m, fmt, block_size, name=f"{n}.weight")) for n, m in quant_targets(model, skip)]


def fake_quant_params(model: nn.Module, fmt: str, block_size: int | None = None, skip=DEFAULT_SKIP
                      ) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": W_q}`` for every target, for ``torch.func.functional_call`` (full mode)."""
    return {f"{n}.weight": w for n, _, w in fake_quant_targets(model, fmt, block_size, skip)}


def raw_weight(module: nn.Module) -> torch.Tensor:
    """A target's stored weight (under a parametrization: its ``original``, never the fake-quantized one)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight that export quantizes: ``W`` as stored, or (LoRA) the fp32 merge ``W + s·B·A``."""
    if isinstance(module, LoRALinear):
        w = module.weight.detach().float()
        return w if module.disabled else merge_weight(w, module.lora_A, module.lora_B, module.scaling)
    return raw_weight(module).detach()


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


# ----------------------------------------------------------------------------- the model-side seam


class FakeQuantWeight(nn.Module):
    """Parametrization of a plain linear's ``weight``: the identity while ``fmt`` is None, else
    ``fake_quant(W, fmt, block_size)`` (``D(Q(W))`` forward, straight-through backward ``dL/dW =
    dL/dW_q``). Set through :func:`fake_quantized`."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fmt: str | None = None
        self.block_size: int | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.fmt is None:
            return w
        return fake_quant(w, self.fmt, self.block_size, name=self.name)

    def extra_repr(self) -> str:
        return f"{self.name}, fmt={self.fmt}, block_size={self.block_size}"


_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, nn.Module]]]" = weakref.WeakKeyDictionary()


def _parametrization(m: nn.Module) -> FakeQuantWeight | None:
    if not parametrize.is_parametrized(m, "weight"):
        return None
    return next((p for p in m.parametrizations.weight if isinstance(p, FakeQuantWeight)), None)


def check_applicable(model: nn.Module, formats: Iterable[str], block_size: int | None = None,
                     skip=DEFAULT_SKIP) -> list[tuple[str, nn.Module]]:
    """Raise a ValueError naming the format and the module if a format cannot fake-quantize a
    target (no target at all, a group that does not divide the width, ...); returns the targets.
    Works on a meta-device model (shapes only)."""
    targets = quant_targets(model, skip)
    if not targets:
        raise ValueError(f"--quant-aware: the model has no linear to quantize (skip {list(parse_skip(skip))})")
    for fmt in parse_formats(formats):
        bs = resolve_block_size(fmt, block_size)
        for name, m in targets:
            try:
                _fq.resolve_block_size(fmt, bs, tuple(raw_weight(m).shape))
            except ValueError as e:
                raise ValueError(f"--quant-aware {fmt}: cannot apply to {name}.weight "
                                 f"{tuple(raw_weight(m).shape)}: {e}") from None
    return targets


def attach(model: nn.Module, skip=DEFAULT_SKIP) -> list[str]:
    """Prepare ``model`` for quantized passes: a :class:`FakeQuantWeight` parametrization (inactive)
    on every plain target's ``weight``; ``LoRALinear`` targets need none. The ``Parameter`` objects
    stay the same (an optimizer built before or after sees the same tensors). Returns the targets'
    names. :func:`detach` undoes it."""
    if model in _ATTACHED:
        raise ValueError("quant-aware: the model is already attached")
    targets = quant_targets(model, skip)
    for name, m in targets:
        if not isinstance(m, LoRALinear):
            parametrize.register_parametrization(m, "weight", FakeQuantWeight(f"{name}.weight"))
    _ATTACHED[model] = targets
    return [n for n, _ in targets]


def detach(model: nn.Module) -> None:
    """Remove :func:`attach`'s parametrizations: each target's ``weight`` is its plain ``Parameter``
    again (the same object), LoRA targets' ``fake_quant`` state is cleared."""
    for _, m in _ATTACHED.pop(model, []):
        if isinstance(m, LoRALinear):
            m.fake_quant = None
        elif _parametrization(m) is not None:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


@contextlib.contextmanager
def attached(model: nn.Module, skip=DEFAULT_SKIP) -> Iterator[list[str]]:
    """:func:`attach` for the duration of the block, :func:`detach` on exit (also on error)."""
    names = attach(model, skip)
    try:
        yield names
    finally:
        detach(model)


@contextlib.contextmanager
def fake_quantized(model: nn.Module, fmt: str, block_size: int | None = None) -> Iterator[nn.Module]:
    """Within the block every target of the attached ``model`` computes with its fake-quantized
    weight ``D(Q(W_eff))`` in ``fmt`` (export's block size; gradients straight through). Gradient
    checkpointing would recompute outside the block: not supported."""
    if model not in _ATTACHED:
        raise ValueError("quant-aware: fake_quantized needs an attached model (call attach first)")
    (fmt,) = parse_formats([fmt])
    bs = resolve_block_size(fmt, block_size)
    targets = _ATTACHED[model]
    try:
        for name, m in targets:
            if isinstance(m, LoRALinear):
                m.fake_quant = (fmt, bs, f"{name}.weight")
            else:
                p = _parametrization(m)
                p.fmt, p.block_size = fmt, bs
        yield model
    finally:
        for _, m in targets:
            if isinstance(m, LoRALinear):
                m.fake_quant = None
            else:
                p = _parametrization(m)
                if p is not None:
                    p.fmt, p.block_size = None, None


_PARAM_NAME = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def plain_name(name: str) -> str:
    """``a.q_proj.parametrizations.weight.original`` -> ``a.q_proj.weight`` (other names unchanged)."""
    return _PARAM_NAME.sub(lambda m: f"{m.group(1)}{m.group(2)}", name)


SAMPLES = ("random", "sum")


def quant_aware_step(step_fn, model: nn.Module, formats: Iterable[str], weight: float = 1.0, sample: str = "random",
                     block_size: int | None = None):
    """Wrap a step function ``step_fn(forget_batch, retain_batch) -> {"loss", "forget_loss",
    "retain_loss"}`` (the method's whole loss: forget term and regularizer) of a ``model`` prepared by
    :func:`attach`: the returned step computes ``L(full precision) + weight · L(quantized)``, where
    ``L(quantized)`` is ``step_fn`` run under :func:`fake_quantized` in one format drawn uniformly per
    call from ``formats`` (``sample="random"``; torch's global generator, so a seeded run draws the
    same formats and a resumed one continues the sequence: the loop checkpoints that state) or the
    sum over all of them (``"sum"``). The dict keeps the full-precision terms under their names and
    adds ``loss_q`` (the quantized total, summed over the formats run)."""
    fmts = parse_formats(formats)
    if sample not in SAMPLES:
        raise ValueError(f"--qa-sample must be one of {SAMPLES}, got {sample!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"--qa-weight must be a finite number >= 0, got {weight!r}")

    def step(fb, rb) -> dict:
        out = step_fn(fb, rb)
        chosen = fmts if sample == "sum" or len(fmts) == 1 else [fmts[int(torch.randint(len(fmts), ()))]]
        loss_q = None
        for fmt in chosen:
            with fake_quantized(model, fmt, block_size):
                q = step_fn(fb, rb)["loss"]
            loss_q = q if loss_q is None else loss_q + q
        return {**out, "loss": out["loss"] + weight * loss_q, "loss_q": loss_q}
    return step

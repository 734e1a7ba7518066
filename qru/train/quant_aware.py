"""Quantization-aware unlearning: the model-side seam and helpers (nothing replaces a module's ``forward``).

The targets are the linears ``qru quantize`` quantizes at export: every plain ``nn.Linear`` and
every :class:`~qru.model.lora_linear.LoRALinear` whose name no ``skip`` entry matches
(:func:`qru.quant.qlinear.is_skipped`; default ``("lm_head",)``, as ``qru quantize --skip``), with
the format's export block size (:func:`qru.quant.qlinear.resolve_block_size`).

* The seam is the layers' own weight transform (:func:`qru.model.linear.set_weight_transform`):
  within :func:`fake_quantized` (a context) every target of a model registered by :func:`attach`
  computes with ``D(Q(W_eff))``: a qru ``Linear`` with ``fake_quant(W)``, a ``LoRALinear`` with
  ``fake_quant_lora(W, A, B, s)`` (adapter merged blockwise; its reference pass with adapters
  disabled stays full precision), gradients straight through the rounding. Outside the context
  nothing is set, so parameters, names, checkpoints, merge and export are untouched.
* :func:`quant_aware_step`: wraps the loop's step function into ``L(full precision) + λ·L(quantized)``
  (the method's forget term and its regularizer alike), one random format per step or the sum;
  optionally plus a margin hinge (:func:`margin_loss`) that keeps the quantized forget NLL above
  the full-precision one.
* :func:`fake_quant_targets` / :func:`fake_quant_params`: each target's ``W_q = D(Q(W_eff))`` as
  tensors (``torch.func.functional_call`` in full mode).
* :func:`snapshot`, :func:`code_flip_frac`: monitoring, the share of the targets' codes that the
  update has changed so far, per format (:func:`qru.quant.codes.code_flips`).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from qru.kernels import fake_quant as _fq
from qru.kernels.fake_quant import FAKE_QUANT_FORMATS, fake_quant, fake_quant_lora
from qru.model.linear import WeightTransformable, set_weight_transform
from qru.model.lora_linear import LoRALinear, merge_weight
from qru.quant import quantize
from qru.quant.qlinear import is_skipped, resolve_block_size
from qru.quant.codes import code_flips

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


def quant_targets(model: nn.Module, skip=DEFAULT_SKIP) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linears quantized at export (``nn.Linear``, qru's ``Linear`` included, or
    ``LoRALinear``), in module order. A QLoRA (NF4) base raises: its weight is already quantized."""
    skip = parse_skip(skip)
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


# ----------------------------------------------------------------------------- the model-side seam


_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, nn.Module]]]" = weakref.WeakKeyDictionary()


def _transform(fmt: str, block_size: int | None, name: str):
    """The weight transform of one target: ``fn(layer, weight) -> D(Q(W_eff))`` (STE). Within one
    quantized pass the weights do not change, so ``W_q`` is computed once and reused by the pass's
    later forwards (e.g. the forget and the retain batch), keyed by the tensors' versions and the
    grad mode (a no-grad ``W_q`` has no graph)."""
    cache: dict = {}

    def fn(layer, w):
        lora = isinstance(layer, LoRALinear) and not layer.disabled
        if isinstance(layer, LoRALinear) and layer.disabled:  # the NPO / KLR reference: full precision
            return w
        key = (torch.is_grad_enabled(), w._version, w.data_ptr()) + (
            (layer.lora_A._version, layer.lora_B._version, layer.scaling) if lora else ())
        if cache.get("key") != key:
            wq = (fake_quant_lora(w, layer.lora_A, layer.lora_B, layer.scaling, fmt, block_size, name=name) if lora
                  else fake_quant(w, fmt, block_size, name=name))
            cache.update(key=key, wq=wq)
        return cache["wq"]
    fn.__name__ = f"fake_quant[{fmt}]"
    return fn


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
                _fq.resolve_block_size(fmt, bs, tuple(m.weight.shape))
            except ValueError as e:
                raise ValueError(f"--quant-aware {fmt}: cannot apply to {name}.weight "
                                 f"{tuple(m.weight.shape)}: {e}") from None
    return targets


def attach(model: nn.Module, skip=DEFAULT_SKIP) -> list[str]:
    """Register ``model``'s targets for quantized passes (:func:`fake_quantized`); the model is not
    modified. Every target must be one of qru's layers (``Linear`` / ``LoRALinear``, which carry the
    weight-transform seam). Returns the targets' names. :func:`detach` undoes it."""
    if model in _ATTACHED:
        raise ValueError("quant-aware: the model is already attached")
    targets = quant_targets(model, skip)
    bad = [n for n, m in targets if not isinstance(m, WeightTransformable)]
    if bad:
        raise ValueError(f"quant-aware: {bad[0]} is a {type(model.get_submodule(bad[0])).__name__}, not a qru Linear "
                         "or LoRALinear (the layers with a weight-transform seam)")
    _ATTACHED[model] = targets
    return [n for n, _ in targets]


def detach(model: nn.Module) -> None:
    """Forget ``model``'s registration and clear any weight transform its targets still hold."""
    for _, m in _ATTACHED.pop(model, []):
        set_weight_transform(m, None)


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
    weight ``D(Q(W_eff))`` in ``fmt`` (export's block size; gradients straight through), through the
    layers' weight-transform seam; on exit the transforms are removed. Gradient checkpointing would
    recompute outside the block: not supported."""
    if model not in _ATTACHED:
        raise ValueError("quant-aware: fake_quantized needs an attached model (call attach first)")
    (fmt,) = parse_formats([fmt])
    bs = resolve_block_size(fmt, block_size)
    targets = _ATTACHED[model]
    try:
        for name, m in targets:
            set_weight_transform(m, _transform(fmt, bs, f"{name}.weight"))
        yield model
    finally:
        for _, m in targets:
            set_weight_transform(m, None)


SAMPLES = ("random", "sum")


MARGIN_GRADS = ("ste", "exact")


def margin_loss(nll_fp: torch.Tensor, nll_q: torch.Tensor, margin: float, grad: str = "ste") -> torch.Tensor:
    """The quant-aware margin (hinge) ``mean_i relu(nll_fp_i - nll_q_i + margin)`` over a batch of
    per-sequence forget NLLs: zero once every sequence's quantized NLL exceeds its full-precision
    one by ``margin`` nats (in the spirit of QUAIL, arXiv 2601.15538, which asks the quantized
    model for a margin rather than mere agreement).

    Gradient, for an active sequence (``nll_fp_i - nll_q_i + margin > 0``; zero otherwise), over a
    batch of B:

    * ``grad="ste"`` (default): ``(∇nll_fp_i(W) - ∇nll_q_i(W_q)) / B``, the quantized side straight
      through the rounding like the forget term's ``L(quantized)``: the gradient of ``W ↦ nll(W) -
      nll(W + R)`` with the rounding residual R frozen. It pushes the quantized forget NLL up and
      pulls the latent one down. Its two parts nearly cancel in size (``≈ -H·R``, H the Hessian, R
      under half a code step), but Adam normalises each coordinate's step, so a heavy weight still
      moves the weights a lot, and codes with them (measured: docs/quant_aware.md).
    * ``grad="exact"``: ``∇nll_fp_i(W) / B`` (``nll_q`` detached). ``W ↦ nll_q(D(Q(W)))`` is
      piecewise constant, so this is the hinge's exact derivative almost everywhere: it only lowers
      the latent model's forget NLL inside its rounding cell, where ``W_q`` does not move; the forget
      term's own STE gradient keeps moving the codes."""
    if nll_fp.shape != nll_q.shape:
        raise ValueError(f"margin_loss: nll_fp {tuple(nll_fp.shape)} and nll_q {tuple(nll_q.shape)} differ")
    if grad not in MARGIN_GRADS:
        raise ValueError(f"--qa-margin-grad must be one of {MARGIN_GRADS}, got {grad!r}")
    q = nll_q.float() if grad == "ste" else nll_q.detach().float()
    return torch.relu(nll_fp.float() - q + margin).mean()


def _check_nonneg(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def quant_aware_step(step_fn, model: nn.Module, formats: Iterable[str], weight: float = 1.0, sample: str = "random",
                     block_size: int | None = None, margin: float | None = None, margin_weight: float = 1.0,
                     margin_grad: str = "ste"):
    """Wrap a step function ``step_fn(forget_batch, retain_batch) -> {"loss", "forget_loss",
    "retain_loss"}`` (the method's whole loss: forget term and regularizer) of a ``model`` prepared by
    :func:`attach`: the returned step computes ``L(full precision) + weight · L(quantized)``, where
    ``L(quantized)`` is ``step_fn`` run under :func:`fake_quantized` in one format drawn uniformly per
    call from ``formats`` (``sample="random"``; torch's global generator, so a seeded run draws the
    same formats and a resumed one continues the sequence: the loop checkpoints that state) or the
    sum over all of them (``"sum"``). The dict keeps the full-precision terms under their names and
    adds ``loss_q`` (the quantized total, summed over the formats run).

    ``margin`` (nats, None: off): adds ``margin_weight · row_share · margin_loss(nll_fp, nll_q,
    margin, margin_grad)`` per format run (:func:`margin_loss`; ``step_fn`` must then return
    ``forget_seq_nll`` and ``row_share``, as :func:`qru.train.unlearn.make_unlearn_step` does), and
    logs ``qa_margin`` (that term, summed over the formats) and ``qa_gap`` (mean ``nll_q - nll_fp``
    of the batch, the last format run)."""
    fmts = parse_formats(formats)
    if sample not in SAMPLES:
        raise ValueError(f"--qa-sample must be one of {SAMPLES}, got {sample!r}")
    _check_nonneg("--qa-weight", weight)
    if margin is not None:
        _check_nonneg("--qa-margin", margin)
        _check_nonneg("--qa-margin-weight", margin_weight)
        if margin_grad not in MARGIN_GRADS:
            raise ValueError(f"--qa-margin-grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")

    def step(fb, rb) -> dict:
        out = step_fn(fb, rb)
        chosen = fmts if sample == "sum" or len(fmts) == 1 else [fmts[int(torch.randint(len(fmts), ()))]]
        if margin is not None and "forget_seq_nll" not in out:
            raise ValueError("--qa-margin: the step function returns no 'forget_seq_nll' (per-sequence forget NLL)")
        loss_q = hinge = gap = None
        for fmt in chosen:
            with fake_quantized(model, fmt, block_size):
                q_out = step_fn(fb, rb)
            q = q_out["loss"]
            loss_q = q if loss_q is None else loss_q + q
            if margin is not None:
                h = (margin_loss(out["forget_seq_nll"], q_out["forget_seq_nll"], margin, margin_grad)
                     * out.get("row_share", 1.0))
                hinge = h if hinge is None else hinge + h
                gap = (q_out["forget_seq_nll"] - out["forget_seq_nll"]).detach().float().mean()
        res = {**out, "loss": out["loss"] + weight * loss_q, "loss_q": loss_q}
        if margin is not None:
            res.update(loss=res["loss"] + margin_weight * hinge, qa_margin=hinge.detach(), qa_gap=gap)
        return res
    return step

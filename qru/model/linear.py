"""The model's linear layer: an ``nn.Linear`` (same parameters, same state-dict names
``weight``/``bias``) whose forward is qru's one linear dispatch, :func:`qru.kernels.linear.linear`.

Reading :meth:`Linear.forward` tells what runs: the dispatch picks the implementation per call
(bf16 skinny C++ kernel, oneDNN dense or with a packed weight, ``F.linear``) from the operands, the
grad mode, ``QRU_BACKEND`` and the machine's calibration; the layer owns the cache slot of its
packed weight. Nothing reroutes the layer from outside.

A seam for weight transforms (e.g. quantization-aware training's fake quantization of the weight,
issue 20): :func:`set_weight_transform` gives one layer a function ``fn(layer, weight) -> weight``
that the layer's own forward applies before the product (differentiable: gradients reach the
weight through it). A transformed weight is a new tensor on every call, so it is not packed.
``None`` (the default) removes the transform. :class:`qru.model.lora_linear.LoRALinear` has the same
seam (there ``fn`` returns the whole effective weight, adapter included, and the layer runs the
dispatch over it instead of its LoRA kernel); both are :class:`WeightTransformable`.

:func:`fused_linears`: a block with several plain layers on one input (attention's q/k/v, the MLP's
gate/up) runs them as one GEMM on a packed concatenated weight where the dispatch packs weights
anyway (no-grad CPU inference, ``qru.kernels.linear.linear_group``); the block calls it in its own
forward and runs its layers one by one when it declines.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.modules import module as _module_mod

from qru.kernels.linear import PackedWeight, linear, linear_group

WeightTransform = Callable[["Linear", torch.Tensor], torch.Tensor]


class WeightTransformable:
    """A layer whose forward applies ``self.weight_transform`` (if set) to its weight; set it with
    :func:`set_weight_transform`."""

    weight_transform: WeightTransform | None = None


class Linear(WeightTransformable, nn.Linear):
    """``y = x Wᵀ + b`` through :func:`qru.kernels.linear.linear`; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.packed_weight = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_transform is not None:
            return linear(x, self.weight_transform(self, self.weight), self.bias)
        return linear(x, self.weight, self.bias, self.packed_weight)

    def extra_repr(self) -> str:
        t = self.weight_transform
        return super().extra_repr() + ("" if t is None else f", weight_transform={getattr(t, '__name__', t)!r}")


def set_weight_transform(layer: nn.Module, fn: WeightTransform | None) -> None:
    """Apply ``fn(layer, weight)`` to ``layer``'s weight in every forward from now on (``None``:
    no transform). ``layer``: a :class:`Linear` or ``LoRALinear`` (qru's model layers are)."""
    if not isinstance(layer, WeightTransformable):
        raise TypeError(f"set_weight_transform needs a qru Linear or LoRALinear, got {type(layer).__name__}")
    if fn is not None and not callable(fn):
        raise TypeError(f"weight transform must be callable or None, got {type(fn).__name__}")
    object.__setattr__(layer, "weight_transform", fn)  # a plain attribute even if fn is an nn.Module
    layer.packed_weight.clear()  # the stored weight's packed copy is not used while transformed


def _hooks_set() -> bool:
    """Global module forward hooks are registered (``torch.nn.modules.module.register_module_forward_*``)."""
    return bool(_module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks)


def fused_linears(layers, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor | None:
    """``cat([layer(x) for layer in layers], -1)`` as one packed GEMM (``packed``: the block's
    slot for the concatenated weight), or None when the layers must run one by one: one of them
    is not a plain :class:`Linear` (LoRA, quantized, a subclass) or has a weight transform, or the
    dispatch would not pack (grad, CUDA, few rows, ...: :func:`qru.kernels.linear.linear_group`), or
    a forward hook would miss the call (hooks on a layer, or global module hooks: e.g. the input
    capture of ``qru.quant.survival``). Memory: the concatenation's packed copy replaces the
    layers' own packed copies."""
    if not x.is_cpu or _hooks_set() or any(type(m) is not Linear or m.weight_transform is not None
                                           or m._forward_hooks or m._forward_pre_hooks for m in layers):
        packed.clear()
        return None
    y = linear_group(x, [m.weight for m in layers], [m.bias for m in layers], packed)
    if y is not None:
        for m in layers:
            if m.packed_weight.packed:
                m.packed_weight.clear()
    return y

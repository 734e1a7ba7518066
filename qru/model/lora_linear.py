"""The LoRA module: ``LoRALinear`` (dense or NF4 base, fused kernel forward), its scale and the exact fp32 merge.

:class:`LoRALinear` keeps the frozen base under nn.Linear's names (``weight``, ``bias``), so the base
state-dict keys do not change; the adapters add ``<module>.lora_A`` (r × in) and ``<module>.lora_B``
(out × r). The forward is the fused kernel op :func:`qru.kernels.lora.lora_linear`. Swapping modules
in a model and adapter files live in :mod:`qru.model.lora`; PEFT names and configs in :mod:`qru.model.peft`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from qru.kernels import quant4
from qru.kernels.linear import PackedWeight, linear
from qru.kernels.lora import lora_linear
from qru.kernels.qtensor import QTensor
from qru.model.linear import WeightTransformable


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


_OLD_NF4_NAMES = {"weight_nf4": "qweight", "weight_absmax": "scales"}


def _renamed_nf4_buffers(module, state_dict, prefix, *_):
    """Load a QLoRA module's state dict written with the older buffer names: ``weight_nf4`` ->
    ``qweight``, ``weight_absmax`` -> ``scales``; ``weight_code`` must be the standard NF4 codebook."""
    for old, new in _OLD_NF4_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    code = state_dict.pop(prefix + "weight_code", None)
    if code is not None and not torch.equal(code.float().reshape(-1).cpu(), quant4.codebook("nf4")):
        raise ValueError(f"{prefix}weight_code is not the standard NF4 codebook; qru's NF4 uses "
                         f"qru.kernels.quant4.NF4_CODE")


class LoRALinear(WeightTransformable, nn.Module):
    """``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` with frozen ``weight``/``bias`` and trainable ``lora_A``/``lora_B``.

    ``init``: ``"default"`` (peft: A kaiming-uniform with a=√5, B zero), ``"gaussian"``
    (A ~ N(0, 1/r), B zero), or a pair ``(A, B)`` of tensors to copy. ``lora_dtype`` defaults
    to fp32 for a half-precision base (as peft's ``autocast_adapter_dtype``), else the base
    dtype. ``disabled=True`` runs the base alone. An NF4 base (QLoRA) comes through
    :meth:`from_nf4` and lives in the buffers ``qweight``/``scales`` (as in
    :class:`qru.quant.qlinear.QuantLinear`); :meth:`qtensor` gives it back as a :class:`QTensor`.
    With a weight transform (:func:`qru.model.linear.set_weight_transform`, e.g. fake quantization)
    the forward is ``linear(x, fn(self, weight), bias)``: ``fn`` returns the whole effective weight,
    adapter included (``weight`` is None for an NF4 base).
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, *, dropout: float = 0.0,
                 use_rslora: bool = False, bias: bool = False, init="default", lora_dtype: torch.dtype | None = None,
                 device=None, dtype: torch.dtype | None = None, generator: torch.Generator | None = None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, in_features, out_features, r, alpha, dropout, use_rslora,
                    init, lora_dtype, generator)

    def _setup(self, weight, bias, in_features, out_features, r, alpha, dropout, use_rslora, init,
               lora_dtype, generator, compute_dtype=None):
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = in_features, out_features
        self.packed_weight = PackedWeight()  # the dense base's packed copy (qru.kernels.linear), adapters off
        self.r, self.lora_alpha, self.use_rslora = r, float(alpha), bool(use_rslora)
        self.lora_dropout = float(dropout)
        self.disabled = False
        if weight is not None:
            weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        base_dtype = compute_dtype or weight.dtype
        device = weight.device if weight is not None else None
        if lora_dtype is None:
            lora_dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=lora_dtype))
        self.reset_lora(init, generator)

    @property
    def scaling(self) -> float:
        return lora_scale(self.r, self.lora_alpha, self.use_rslora)

    @torch.no_grad()
    def reset_lora(self, init="default", generator: torch.Generator | None = None) -> None:
        if isinstance(init, (tuple, list)):
            A, B = init
            if tuple(A.shape) != tuple(self.lora_A.shape):
                raise ValueError(f"init lora_A shape {tuple(A.shape)} != {tuple(self.lora_A.shape)}")
            if tuple(B.shape) != tuple(self.lora_B.shape):
                raise ValueError(f"init lora_B shape {tuple(B.shape)} != {tuple(self.lora_B.shape)}")
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            return
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r, generator=generator)
        else:
            raise ValueError(f"unknown LoRA init {init!r} (use 'default', 'gaussian' or a pair (A, B))")
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                    init="default", lora_dtype: torch.dtype | None = None,
                    generator: torch.Generator | None = None) -> "LoRALinear":
        """Wrap ``linear``: its ``weight``/``bias`` Parameters are shared (no copy) and frozen."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._setup(linear.weight, linear.bias, linear.in_features, linear.out_features, r, alpha, dropout,
                 use_rslora, init, lora_dtype, generator)
        return m

    @classmethod
    def from_nf4(cls, qweight: QTensor, r: int, alpha: float, *, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, dropout: float = 0.0, use_rslora: bool = False,
                 init="default", lora_dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None) -> "LoRALinear":
        """QLoRA: a frozen NF4 base, an nf4 :class:`QTensor` (``qru.quant.quantize(W, "nf4")``; a nested
        absmax is decoded once). ``compute_dtype`` (the dtype ``x`` must have) defaults to the QTensor's
        original dtype. A state dict with the buffer names of older versions (``weight_nf4``,
        ``weight_absmax``, ``weight_code``) still loads."""
        if not isinstance(qweight, QTensor) or qweight.fmt != "nf4" or len(qweight.shape) != 2:
            what = f"a {qweight.fmt} QTensor of shape {tuple(qweight.shape)}" if isinstance(qweight, QTensor) \
                else type(qweight).__name__
            raise TypeError(f"from_nf4 needs a 2-D nf4 QTensor (qru.quant.quantize(W, 'nf4')), got {what}")
        compute_dtype = compute_dtype or qweight.dtype
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.register_buffer("qweight", qweight.data.reshape(-1))
        m.register_buffer("scales", qweight.absmax().reshape(-1).float())
        m.nf4_block_size = qweight.block_size
        m.compute_dtype = compute_dtype
        m.register_load_state_dict_pre_hook(_renamed_nf4_buffers)
        out_f, in_f = qweight.shape
        b = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False) if bias is not None else None
        m._setup(None, b, in_f, out_f, r, alpha, dropout, use_rslora, init, lora_dtype, generator,
                 compute_dtype=compute_dtype)
        with torch.no_grad():
            m.lora_A.data = m.lora_A.data.to(qweight.device)
            m.lora_B.data = m.lora_B.data.to(qweight.device)
        return m

    @property
    def is_nf4(self) -> bool:
        return self.weight is None

    def qtensor(self) -> QTensor | None:
        """The NF4 base as a :class:`QTensor` sharing the buffers (None for a dense base)."""
        if not self.is_nf4:
            return None
        return QTensor(data=self.qweight, scales=self.scales, zeros=None,
                       shape=torch.Size((self.out_features, self.in_features)), dtype=self.compute_dtype,
                       fmt="nf4", block_size=self.nf4_block_size)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base as a dense tensor (NF4 decoded)."""
        if self.is_nf4:
            return self.qtensor().dequantize(dtype or self.compute_dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_transform is not None:
            return linear(x, self.weight_transform(self, self.weight), self.bias)
        nf4 = self.qtensor()
        if self.disabled:
            return lora_linear(x, self.weight, self.bias, None, None, 0.0, nf4=nf4, packed=self.packed_weight)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training, nf4=nf4)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + s·B A`` in fp32, cast to the base dtype (the compute dtype for NF4)."""
        if self.is_nf4:
            W = self.qtensor().dequantize(torch.float32)
            return merge_weight(W, self.lora_A, self.lora_B, self.scaling).to(self.compute_dtype)
        return merge_weight(self.weight, self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        base = "nf4" if self.is_nf4 else str(self.weight.dtype).replace("torch.", "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:.4g}, dropout={self.lora_dropout}, "
                f"base={base}, disabled={self.disabled}")



def merge_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale·B A`` computed in fp32, cast to ``W.dtype``. Returns a new tensor."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != tuple(W.shape):
        raise ValueError(f"merge_weight: W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} "
                         f"do not satisfy W = (out, in), A = (r, in), B = (out, r)")
    with torch.no_grad():
        dev = W.device
        out = torch.addmm(W.detach().float(), B.detach().to(dev, torch.float32), A.detach().to(dev, torch.float32),
                          alpha=float(scale))
    return out.to(W.dtype)


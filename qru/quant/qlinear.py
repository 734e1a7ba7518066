"""Quantized linear layers by module swap: :class:`QuantLinear` and :func:`quantize_model`.

A :class:`QuantLinear` holds a weight as :func:`qru.quant.quantize` packs it (nf4 / fp4 /
int4 / int4_sym / int8, nested absmax optional) and dequantizes on the fly in its forward
through :func:`qru.kernels.qmatmul.quant_linear` (fused C++ for decode-sized inputs on CPU,
Triton on CUDA, dequantize + ``F.linear`` otherwise). GGUF block formats (q8_0, q4_0, q4_1,
q5_0, q5_1, q4_k, mxfp4) always dequantize + ``F.linear``. Activations are computed in
``compute_dtype``; the output comes back in the input's dtype (as bitsandbytes'
``Linear4bit``).

Packed tensors are buffers (``qweight``, ``scales``, ``zeros``, ``absmax2``, ``offset``,
``code2``); ``model.to(dtype)`` never casts them (it moves them, casts the bias and sets
``compute_dtype``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from qru.kernels import quant4, quant_int
from qru.kernels.qmatmul import quant_linear
from qru.quant.formats import (ALL_FORMATS, DEFAULT_BLOCK_SIZE, GGUF_FORMATS, DoubleQuant, QTensor,
                               _nested_dequantize, quantize)

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_compute_dtype(dtype) -> torch.dtype:
    """A float dtype from a torch dtype or a name (``bf16``, ``bfloat16``, ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[dtype.lower()]
    raise ValueError(f"compute dtype must be float32, bfloat16 or float16 (or fp32/bf16/fp16), got {dtype!r}")


def resolve_block_size(fmt: str, block_size: int | None) -> int | None:
    """The effective block (group) size of ``fmt``: the default when None, None for int8
    (per output channel; a given value is ignored); GGUF formats' fixed block (None or that
    value). Raises ``ValueError`` naming a bad value."""
    if fmt not in ALL_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r} (known: {', '.join(ALL_FORMATS)})")
    if fmt == "int8":
        return None
    if fmt in GGUF_FORMATS:
        if block_size not in (None, DEFAULT_BLOCK_SIZE[fmt]):
            raise ValueError(f"block size {block_size!r} does not fit {fmt}: its block is fixed at "
                             f"{DEFAULT_BLOCK_SIZE[fmt]}")
        return DEFAULT_BLOCK_SIZE[fmt]
    if block_size is None:
        return DEFAULT_BLOCK_SIZE[fmt]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in quant4.BLOCK_SIZES:
        raise ValueError(f"block size {block_size!r} does not fit {fmt}: it must be a power of two between "
                         f"{quant4.BLOCK_SIZES[0]} and {quant4.BLOCK_SIZES[-1]}")
    return block_size


class QuantLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` a packed :class:`QTensor` of shape ``(out, in)``.

    Build with :meth:`from_linear` (quantize an ``nn.Linear``) or :meth:`from_qtensor`.
    ``weight_dtype`` records the dtype the weight was quantized from.
    """

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not isinstance(qweight, QTensor):
            raise TypeError(f"qweight must be a QTensor, got {type(qweight).__name__}")
        if len(qweight.shape) != 2:
            raise ValueError(f"a linear weight is 2-D (out, in), got shape {tuple(qweight.shape)}")
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self.fmt = qweight.fmt
        self.block_size = qweight.block_size
        self.weight_dtype = qweight.dtype
        self.compute_dtype = parse_compute_dtype(compute_dtype)
        dq = qweight.double_quant
        self.nested_block_size = dq.block_size if dq is not None else None
        self.register_buffer("qweight", qweight.data.reshape(-1))
        self.register_buffer("scales", qweight.scales)
        self.register_buffer("zeros", qweight.zeros)
        self.register_buffer("absmax2", dq.absmax2 if dq is not None else None)
        self.register_buffer("offset", dq.offset.reshape(()) if dq is not None else None)
        self.register_buffer("code2", dq.code if dq is not None else None)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().to(self.compute_dtype).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._absmax_cache: torch.Tensor | None = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_qtensor(cls, qweight: QTensor, bias: torch.Tensor | None = None,
                     compute_dtype: torch.dtype = torch.bfloat16) -> "QuantLinear":
        return cls(qweight, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, block_size: int | None = None, *, double_quant: bool = False,
                    compute_dtype: torch.dtype | None = None, name: str = "linear") -> "QuantLinear":
        """Quantize ``linear.weight`` as it is (fp32 stays fp32: no cast before quantizing).
        ``compute_dtype`` defaults to the weight's dtype. Errors name the module ``name``."""
        w = linear.weight.detach()
        bs = resolve_block_size(fmt, block_size)
        try:
            q = quantize(w, fmt, bs, double_quant=double_quant)
        except ValueError as e:
            raise ValueError(f"cannot quantize {name}.weight (shape {tuple(w.shape)}) to {fmt}: {e}") from None
        return cls(q, linear.bias, compute_dtype or w.dtype)

    # -- state ---------------------------------------------------------------------------
    def qtensor(self) -> QTensor:
        """The packed weight as a :class:`QTensor` (sharing storage)."""
        dq = None
        if self.absmax2 is not None:
            dq = DoubleQuant(absmax2=self.absmax2, offset=self.offset, code=self.code2,
                             block_size=self.nested_block_size)
        return QTensor(data=self.qweight, scales=self.scales, zeros=self.zeros,
                       shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                       fmt=self.fmt, block_size=self.block_size, double_quant=dq)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized ``(out, in)`` weight (default: the compute dtype)."""
        return self.qtensor().dequantize(dtype or self.compute_dtype)

    def fp32_scales(self) -> torch.Tensor:
        """nf4/fp4: fp32 absmax per block (nested state decoded once and cached); int formats: scales."""
        if self.absmax2 is None:
            return self.scales
        c = self._absmax_cache
        if c is None or c.device != self.scales.device:
            c = _nested_dequantize(self.scales, self.qtensor().double_quant)
            self._absmax_cache = c
        return c

    def _apply(self, fn, recurse=True):
        """Packed buffers only change device; a dtype cast (``.to(bf16)``, ``.half()``) casts
        the bias and becomes the compute dtype."""
        packed = {k: self._buffers[k] for k in ("qweight", "scales", "zeros", "absmax2", "offset", "code2")}
        ref = self.qweight
        probe32 = fn(torch.empty(0, dtype=torch.float32, device=ref.device))
        probe16 = fn(torch.empty(0, dtype=torch.bfloat16, device=ref.device))
        for k in packed:
            self._buffers[k] = None
        super()._apply(fn, recurse)
        for k, t in packed.items():
            self._buffers[k] = None if t is None else t.to(probe32.device)
        if probe32.dtype == probe16.dtype and probe32.dtype in (torch.float32, torch.bfloat16, torch.float16):
            self.compute_dtype = probe32.dtype
        self._absmax_cache = None
        return self

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x.dtype
        if self.fmt in GGUF_FORMATS:
            return F.linear(x.to(self.compute_dtype), self.dequantize_weight(self.compute_dtype), self.bias).to(inp)
        y = quant_linear(x.to(self.compute_dtype), self.qweight, self.fp32_scales(), self.zeros, self.fmt,
                         self.block_size, self.out_features, self.in_features, self.bias)
        return y.to(inp)

    def extra_repr(self) -> str:
        bs = f", block_size={self.block_size}" if self.fmt != "int8" else ""
        nested = ", double_quant=True" if self.absmax2 is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{bs}{nested}, "
                f"bias={self.bias is not None}, compute_dtype={dtype_name(self.compute_dtype)}")


# ----------------------------------------------------------------------------------------
# Module swap
# ----------------------------------------------------------------------------------------
def _as_tuple(skip) -> tuple[str, ...]:
    if skip is None:
        return ()
    if isinstance(skip, str):
        return tuple(s.strip() for s in skip.split(",") if s.strip())
    return tuple(skip)


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """True if a skip entry is the module name, a suffix or a component run of it
    (``lm_head``, ``mlp``, ``layers.0.mlp.down_proj``; ``proj`` does not match ``q_proj``)."""
    return any(f".{s}." in f".{name}." for s in skip)


def split_linears(model: nn.Module, skip=()) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """(targeted ``nn.Linear`` modules (qru's ``Linear`` included) as (name, module), skipped linear
    names), in module order."""
    skip = _as_tuple(skip)
    targets, skipped = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if is_skipped(name, skip):
                skipped.append(name)
            else:
                targets.append((name, m))
    return targets, skipped


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quantization_config(fmt: str, block_size: int | None, double_quant: bool, compute_dtype: torch.dtype,
                        skipped: list[str]) -> dict:
    """The ``quantization_config`` of ``config.json``: bitsandbytes' for nf4/fp4 (so transformers
    loads the checkpoint pre-quantized), qru's for int4/int4_sym/int8 (docs/formats.md)."""
    cd = dtype_name(compute_dtype)
    if fmt in quant4.FORMATS_4BIT:
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_quant_type": fmt,
                "bnb_4bit_use_double_quant": bool(double_quant), "bnb_4bit_compute_dtype": cd,
                "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": list(skipped),
                "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
                "llm_int8_enable_fp32_cpu_offload": False}
    return {"quant_method": "qru", "format": fmt, "block_size": block_size, "compute_dtype": cd,
            "skip_modules": list(skipped), "layout_version": 1}


def quantize_model(model: nn.Module, fmt: str, block_size: int | None = None, *, skip=("lm_head",),
                   double_quant: bool = False, compute_dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` not matched by ``skip`` with a :class:`QuantLinear`
    quantized from its current weight (an fp32 model is quantized from fp32), in place.

    ``block_size``: the 4-bit block or int4 group (default 64 / 128); ignored for int8 (per
    output channel). ``compute_dtype`` (default: the model's floating dtype) is the activation
    dtype of the quantized layers; the rest of the model (embeddings, norms, skipped linears)
    is cast to it. A linear tied to another module (tied ``lm_head``) must be skipped.
    Everything is checked before the model is modified. Returns ``model``.
    """
    bs = resolve_block_size(fmt, block_size)
    if double_quant and fmt not in quant4.FORMATS_4BIT:
        raise ValueError(f"double_quant applies to nf4/fp4 only, not {fmt!r}")
    floats = [p for p in model.parameters() if p.is_floating_point()]
    if compute_dtype is None:
        compute_dtype = floats[0].dtype if floats else torch.float32
    compute_dtype = parse_compute_dtype(compute_dtype)
    targets, skipped = split_linears(model, skip)
    # checks first, so a failure leaves the model untouched
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, m in targets:
        shared = [o for o in owners.get(id(m.weight), []) if o != f"{name}.weight"]
        if shared:
            raise ValueError(f"{name}.weight is tied to {shared[0]}; add {name!r} to skip to keep the tie")
        if m.weight.is_meta:
            raise ValueError(f"{name}.weight is on the meta device; load the weights first")
        if fmt in quant_int.INT_FORMATS and fmt != "int8" and m.in_features % 2:
            raise ValueError(f"{name}: in_features={m.in_features} is odd; {fmt} packs two values per byte along "
                             f"in_features and needs it even (skip this module or use nf4/fp4/int8)")
        bad = ~torch.isfinite(m.weight.detach())
        if bad.any():
            raise ValueError(f"{name}.weight has {int(bad.sum())} non-finite value(s) (NaN or Inf); cannot quantize")
    for name, m in targets:
        _set_submodule(model, name, QuantLinear.from_linear(m, fmt, bs, double_quant=double_quant,
                                                            compute_dtype=compute_dtype, name=name))
    model.to(compute_dtype)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "replace") and hasattr(cfg, "quantization_config"):
        model.config = cfg.replace(torch_dtype=dtype_name(compute_dtype),
                                   quantization_config=quantization_config(fmt, bs, double_quant, compute_dtype,
                                                                           skipped))
    return model

"""LoRA adapters by module swap: ``LoRALinear``, ``apply_lora``, exact fp32 merge, PEFT-format I/O.

``apply_lora`` replaces the targeted ``nn.Linear`` modules in place with :class:`LoRALinear`,
which keeps the frozen base under nn.Linear's names (``weight``, ``bias``), so the base
state-dict keys do not change; the adapters add ``<module>.lora_A`` (r × in) and
``<module>.lora_B`` (out × r). The forward is the fused kernel op
:func:`qru.kernels.lora.lora_linear`.

On disk adapters use PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``,
keys ``base_model.model.<module>.lora_A.weight``), so an adapter trained here loads in peft
and the reverse. :func:`merge_weight`, :func:`map_adapter_keys`, :func:`adapter_scales` and
:func:`merge_state_dict` work on raw tensors/state dicts for shard-by-shard merging.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from qru.io import staged_dir, write_bytes, write_text
from qru.kernels.linear import PackedWeight, linear
from qru.kernels.lora import NF4Weight, lora_linear
from qru.model.checkpoint import load_safetensors
from qru.model.linear import Linear, WeightTransformable

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """A malformed adapter, or one that does not fit the model. The message names the key/field."""


# ----------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------
def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(WeightTransformable, nn.Module):
    """``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` with frozen ``weight``/``bias`` and trainable ``lora_A``/``lora_B``.

    ``init``: ``"default"`` (peft: A kaiming-uniform with a=√5, B zero), ``"gaussian"``
    (A ~ N(0, 1/r), B zero), or a pair ``(A, B)`` of tensors to copy. ``lora_dtype`` defaults
    to fp32 for a half-precision base (as peft's ``autocast_adapter_dtype``), else the base
    dtype. ``disabled=True`` runs the base alone. An NF4 base (QLoRA) comes through
    :meth:`from_nf4` and lives in the buffers ``weight_nf4``/``weight_absmax``/``weight_code``.
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
    def from_nf4(cls, qweight, r: int, alpha: float, *, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, dropout: float = 0.0, use_rslora: bool = False,
                 init="default", lora_dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None) -> "LoRALinear":
        """QLoRA: a frozen NF4 base (``NF4Weight``, an nf4 ``qru.quant.formats.QTensor``, or any
        object with data/absmax/shape[/block_size/code]). ``compute_dtype`` (the dtype ``x`` must
        have) defaults to the QTensor's original dtype, else bf16."""
        q = NF4Weight.from_qtensor(qweight)
        if compute_dtype is None:
            orig = getattr(qweight, "dtype", None)
            compute_dtype = orig if isinstance(orig, torch.dtype) and orig.is_floating_point else torch.bfloat16
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.register_buffer("weight_nf4", q.data)
        m.register_buffer("weight_absmax", q.absmax)
        m.register_buffer("weight_code", q.code)
        m.nf4_block_size = q.block_size
        m.compute_dtype = compute_dtype
        out_f, in_f = q.shape
        b = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False) if bias is not None else None
        m._setup(None, b, in_f, out_f, r, alpha, dropout, use_rslora, init, lora_dtype, generator,
                 compute_dtype=compute_dtype)
        with torch.no_grad():
            m.lora_A.data = m.lora_A.data.to(q.device)
            m.lora_B.data = m.lora_B.data.to(q.device)
        return m

    @property
    def is_nf4(self) -> bool:
        return self.weight is None and hasattr(self, "weight_nf4")

    def nf4_weight(self) -> NF4Weight | None:
        if not self.is_nf4:
            return None
        return NF4Weight(self.weight_nf4, self.weight_absmax, (self.out_features, self.in_features),
                         self.nf4_block_size, self.weight_code)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base as a dense tensor (NF4 decoded)."""
        if self.is_nf4:
            return self.nf4_weight().dequantize(dtype or self.compute_dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_transform is not None:
            return linear(x, self.weight_transform(self, self.weight), self.bias)
        nf4 = self.nf4_weight()
        if self.disabled:
            return lora_linear(x, self.weight, self.bias, None, None, 0.0, nf4=nf4, packed=self.packed_weight)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training, nf4=nf4)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + s·B A`` in fp32, cast to the base dtype (the compute dtype for NF4)."""
        if self.is_nf4:
            W = self.nf4_weight().dequantize(torch.float32)
            return merge_weight(W, self.lora_A, self.lora_B, self.scaling).to(self.compute_dtype)
        return merge_weight(self.weight, self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        base = "nf4" if self.is_nf4 else str(self.weight.dtype).replace("torch.", "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:.4g}, dropout={self.lora_dropout}, "
                f"base={base}, disabled={self.disabled}")


# ----------------------------------------------------------------------------------------
# Model-level helpers
# ----------------------------------------------------------------------------------------
@dataclass
class LoRAStats:
    """Parameter counts after :func:`apply_lora`."""
    trainable: int
    total: int
    modules: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f} ({self.modules} LoRA modules)")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def lora_stats(model: nn.Module) -> LoRAStats:
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    mods = list(lora_modules(model))
    total += sum(m.in_features * m.out_features for _, m in mods if m.is_nf4)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return LoRAStats(trainable, total, len(mods))


def _matches(name: str, targets) -> bool:
    """peft's rule: a list matches a module whose name is, or ends with ``.``, an entry; a str is a full regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _pattern_value(name: str, pattern: Mapping[str, object] | None, default):
    """peft's rank_pattern/alpha_pattern lookup: the first key that matches the end of ``name``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def apply_lora(model: nn.Module, targets=TARGETS, r: int = 8, alpha: float = 16, dropout: float = 0.0, *,
               use_rslora: bool = False, init="default", lora_dtype: torch.dtype | None = None,
               rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None,
               seed: int | None = None) -> LoRAStats:
    """Swap the targeted ``nn.Linear`` modules for :class:`LoRALinear` in place and freeze everything else.

    ``targets`` as peft's ``target_modules``: a list of names matched against the end of each
    module's dotted name, or a string regex matched against the whole name. Returns counts.
    """
    if any(True for _ in lora_modules(model)):
        raise ValueError("apply_lora: the model already has LoRA modules")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise ValueError(f"apply_lora: no nn.Linear module matches targets {targets!r}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        lin = model.get_submodule(name)
        rr = int(_pattern_value(name, rank_pattern, r))
        aa = float(_pattern_value(name, alpha_pattern, alpha))
        new = LoRALinear.from_linear(lin, rr, aa, dropout=dropout, use_rslora=use_rslora, init=init,
                                     lora_dtype=lora_dtype, generator=gen)
        _set_submodule(model, name, new)
    for _, m in lora_modules(model):
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    return lora_stats(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model only (reference log-probs for NPO/KL); restores each module's flag."""
    mods = [m for _, m in lora_modules(model)]
    prev = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, p in zip(mods, prev):
            m.disabled = p


# ----------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------
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


def merge_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged model's state dict: HF key names, ``<module>.weight = W + s·B A`` (fp32 math,
    base dtype), no LoRA keys. The model is not modified; untouched tensors are shared, not copied."""
    mods = dict(lora_modules(model))
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    skip = ("lora_A", "lora_B", "weight_nf4", "weight_absmax", "weight_code")
    for key, t in sd.items():
        mod, _, leaf = key.rpartition(".")
        if mod in mods and leaf in skip:
            continue
        out[key] = t.detach()
    for name, m in mods.items():
        out[f"{name}.weight"] = m.merged_weight()
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach()
    return {k: out[k] for k in sorted(out, key=_state_key_order(sd))}


def _state_key_order(sd):
    order = {k.replace("weight_nf4", "weight"): i for i, k in enumerate(sd)}
    return lambda k: order.get(k, len(order))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """In place and explicit: replace every LoRALinear by a :class:`qru.model.linear.Linear` holding
    the merged weight."""
    for name, m in list(lora_modules(model)):
        W = m.merged_weight()
        lin = Linear(m.in_features, m.out_features, bias=m.bias is not None, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        lin.requires_grad_(False)
        _set_submodule(model, name, lin)
    return model


# ----------------------------------------------------------------------------------------
# PEFT key names and raw state-dict merging
# ----------------------------------------------------------------------------------------
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def peft_key(module_name: str, which: str) -> str:
    """``model.layers.0.self_attn.q_proj``, ``lora_A`` → ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    if which not in ("lora_A", "lora_B"):
        raise ValueError(f"peft_key: which must be 'lora_A' or 'lora_B', got {which!r}")
    return f"{PEFT_PREFIX}{module_name}.{which}.weight"


def parse_peft_key(key: str) -> tuple[str, str]:
    """PEFT adapter key → (module name, ``lora_A``|``lora_B``). Accepts the adapter-name form
    (``...lora_A.default.weight``) too. Raises :class:`AdapterError` naming the key otherwise."""
    m = _PEFT_KEY.match(key)
    if m is None:
        raise AdapterError(f"adapter key {key!r} is not a LoRA A/B weight (unsupported adapter content)")
    return m["module"], m["which"]


def map_adapter_keys(adapter_keys) -> dict[str, tuple[str, str]]:
    """Base weight key → (A key, B key) for every module in a PEFT adapter state dict (or key list)."""
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter_keys:
        module, which = parse_peft_key(key)
        pairs.setdefault(module, {})[which] = key
    out = {}
    for module, d in pairs.items():
        for which in ("lora_A", "lora_B"):
            if which not in d:
                other = next(iter(d.values()))
                raise AdapterError(f"adapter has {other!r} but no {which} for module {module!r}")
        out[f"{module}.weight"] = (d["lora_A"], d["lora_B"])
    return out


def adapter_scales(adapter_state_dict: Mapping[str, torch.Tensor], adapter_config: Mapping) -> dict[str, float]:
    """Base weight key → LoRA scale, from the config's r/lora_alpha/use_rslora and rank/alpha patterns."""
    cfg = _validate_config(adapter_config)
    out = {}
    for wkey, (akey, _) in map_adapter_keys(adapter_state_dict.keys()).items():
        module = wkey[: -len(".weight")]
        r = int(_pattern_value(module, cfg.get("rank_pattern"), cfg["r"]))
        if adapter_state_dict[akey].shape[0] != r:
            raise AdapterError(f"adapter key {akey!r} has rank {adapter_state_dict[akey].shape[0]} "
                               f"but the config says r={r}")
        alpha = float(_pattern_value(module, cfg.get("alpha_pattern"), cfg["lora_alpha"]))
        out[wkey] = lora_scale(r, alpha, bool(cfg.get("use_rslora", False)))
    return out


def merge_state_dict(base_state_dict: Mapping[str, torch.Tensor], adapter_state_dict: Mapping[str, torch.Tensor],
                     adapter_config: Mapping, strict: bool = True) -> dict[str, torch.Tensor]:
    """Merge a PEFT adapter into a (possibly partial, e.g. one shard) base state dict.

    Returns a new dict: merged ``<module>.weight`` tensors (fp32 math, base dtype) and the
    other base tensors unchanged. With ``strict`` every adapter module must be present.
    """
    scales = adapter_scales(adapter_state_dict, adapter_config)
    keymap = map_adapter_keys(adapter_state_dict.keys())
    if not keymap:
        raise AdapterError("the adapter has no LoRA tensors")
    out = dict(base_state_dict)
    for wkey, (akey, bkey) in keymap.items():
        if wkey not in base_state_dict:
            if strict:
                raise AdapterError(f"base state dict has no {wkey!r} for adapter key {akey!r}")
            continue
        W, A, B = base_state_dict[wkey], adapter_state_dict[akey], adapter_state_dict[bkey]
        _check_pair(akey, bkey, A, B, tuple(W.shape))
        out[wkey] = merge_weight(W, A, B, scales[wkey])
    return out


def _check_pair(akey, bkey, A, B, w_shape):
    out_f, in_f = w_shape
    if A.dim() != 2 or A.shape[1] != in_f:
        raise AdapterError(f"adapter key {akey!r} has shape {tuple(A.shape)}, expected (r, {in_f})")
    if B.dim() != 2 or tuple(B.shape) != (out_f, A.shape[0]):
        raise AdapterError(f"adapter key {bkey!r} has shape {tuple(B.shape)}, expected ({out_f}, {A.shape[0]})")


# ----------------------------------------------------------------------------------------
# PEFT files
# ----------------------------------------------------------------------------------------
# PEFT LoraConfig fields that change the adapter's math (or the model around it) when set, with
# the values that leave it unchanged; qru refuses any other value instead of ignoring it.
_UNSUPPORTED = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "lora_bias": (False, None),
                "bias": ("none", None), "modules_to_save": (None, []), "layers_to_transform": (None,),
                "layers_pattern": (None, "", []), "layer_replication": (None,), "trainable_token_indices": (None,),
                "target_parameters": (None, []), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
                "megatron_config": (None,), "arrow_config": (None,), "use_bdlora": (None, False),
                "kasa_config": (None,), "velora_config": (None,), "monteclora_config": (None,)}


def _validate_config(cfg: Mapping, where: str = "adapter_config") -> dict:
    """Check a PEFT ``adapter_config`` (types, and that no unsupported field is set); ``where``
    names the file in the errors."""
    if not isinstance(cfg, Mapping):
        raise AdapterError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    cfg = dict(cfg)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: field 'peft_type' is {cfg['peft_type']!r}, only 'LORA' is supported")
    for field in ("r", "lora_alpha"):
        if field not in cfg:
            raise AdapterError(f"{where}: missing field {field!r}")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise AdapterError(f"{where}: field 'r' must be a positive integer, got {r!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise AdapterError(f"{where}: field 'lora_alpha' must be a finite number, got {alpha!r}")
    d = cfg.get("lora_dropout", 0.0)
    if not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1):
        raise AdapterError(f"{where}: field 'lora_dropout' must be a number in [0, 1), got {d!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterError(f"{where}: field 'use_rslora' must be a JSON boolean, got {cfg['use_rslora']!r}")
    for field, number in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pat = cfg.get(field)
        if pat is not None and not (isinstance(pat, dict) and all(
                isinstance(k, str) and isinstance(v, number) and not isinstance(v, bool) for k, v in pat.items())):
            raise AdapterError(f"{where}: field {field!r} must map module names to numbers, got {pat!r}")
    for field, ok in _UNSUPPORTED.items():
        if field in cfg and cfg[field] not in ok:
            raise AdapterError(f"{where}: field {field!r}={cfg[field]!r} is not supported (it changes the "
                               f"adapter's math; qru needs {ok[0]!r})")
    return cfg


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict with PEFT keys) from an adapter directory, validated: a LoRA config qru
    can apply, at least one tensor, every key a LoRA A/B weight, finite floating-point tensors."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"adapter config not found: {cfg_path}")
    try:
        cfg = json.loads(cfg_path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise AdapterError(f"{cfg_path}: malformed JSON ({type(e).__name__}: {str(e)[:200]})") from None
    cfg = _validate_config(cfg, str(cfg_path))
    w_path = path / WEIGHTS_NAME
    if w_path.exists():
        sd = load_safetensors(w_path)
    elif (path / "adapter_model.bin").exists():
        w_path = path / "adapter_model.bin"
        try:
            sd = torch.load(w_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise AdapterError(f"{w_path}: corrupt or not a PyTorch state dict ({type(e).__name__})") from None
        if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
            raise AdapterError(f"{w_path}: not a state dict of tensors")
    else:
        raise FileNotFoundError(f"adapter weights not found: {w_path}")
    if not sd:
        raise AdapterError(f"{w_path}: the adapter has no tensors")
    for key, t in sd.items():
        parse_peft_key(key)
        if not t.is_floating_point():
            raise AdapterError(f"{w_path}: adapter tensor {key!r} has dtype {t.dtype}, expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{w_path}: adapter tensor {key!r} has {int((~torch.isfinite(t)).sum())} non-finite "
                               "value(s) (NaN or Inf)")
    return cfg, sd


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata={"format": "pt"}))


def _atomic_write_text(path: Path, text: str) -> None:
    write_text(path, text)


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The PEFT ``adapter_config.json`` content describing the model's LoRA modules."""
    mods = dict(lora_modules(model))
    if not mods:
        raise ValueError("the model has no LoRA modules")
    ranks = Counter(m.r for m in mods.values())
    alphas = Counter(m.lora_alpha for m in mods.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rslora = {m.use_rslora for m in mods.values()}
    dropouts = {m.lora_dropout for m in mods.values()}
    if len(rslora) > 1 or len(dropouts) > 1:
        raise ValueError("LoRA modules mix use_rslora or dropout settings; PEFT's config holds one value")
    # A list of short names when it selects exactly these modules, else an exact-name regex.
    short = sorted({n.rsplit(".", 1)[-1] for n in mods})
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}
    selected = {n for n in linears if _matches(n, short)}
    targets = short if selected == set(mods) else "|".join(re.escape(n) for n in sorted(mods))
    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return {
        "alpha_pattern": {n: m.lora_alpha for n, m in mods.items() if m.lora_alpha != alpha},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": dropouts.pop(),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {n: m.r for n, m in mods.items() if m.r != r},
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": rslora.pop(),
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT key names (contiguous CPU copies)."""
    out = {}
    for name, m in lora_modules(model):
        out[peft_key(name, "lora_A")] = m.lora_A.detach().to("cpu").contiguous().clone()
        out[peft_key(name, "lora_B")] = m.lora_B.detach().to("cpu").contiguous().clone()
    return out


def write_adapter(model: nn.Module, stage: str | os.PathLike, base_model_name_or_path: str | None = None,
                  name: str | os.PathLike | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT layout) into the existing
    directory ``stage``, each file atomically (no directory commit). A non-finite adapter tensor is
    refused before anything is written, naming the tensor and the adapter (``name``, else ``stage``)."""
    stage = Path(stage)
    cfg = adapter_config(model, base_model_name_or_path)
    tensors = adapter_state_dict(model)
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(f"{Path(name or stage) / WEIGHTS_NAME}: not written: adapter tensor {key!r} has "
                               f"{bad} non-finite value(s) (NaN or Inf)")
    _atomic_save_safetensors(tensors, stage / WEIGHTS_NAME)
    _atomic_write_text(stage / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return stage


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter (PEFT layout) to the directory ``path``, committed atomically
    (:func:`qru.io.staged_dir`): in an existing ``path`` the adapter files are replaced in one rename
    and other files (a tokenizer, a README) are kept. A non-finite tensor writes nothing."""
    path = Path(path)
    adapter_config(model, base_model_name_or_path)  # fails before anything is staged
    with staged_dir(path, keep=lambda name: not name.startswith("adapter_")) as stage:
        write_adapter(model, stage, base_model_name_or_path, name=path)
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``.

    A model without LoRA modules gets them (on exactly the adapter's modules, with the
    config's r/alpha/dropout/rsLoRA and patterns). A model with LoRA modules must match:
    shapes are checked and a mismatch raises :class:`AdapterError` naming the key; with
    ``strict`` every LoRA module must receive weights. The config's scaling is applied.
    """
    cfg, sd = read_adapter(path)
    keymap = map_adapter_keys(sd.keys())
    if not keymap:
        raise AdapterError(f"{path}: the adapter has no LoRA tensors")
    scales_cfg = {}
    for wkey, (akey, _) in keymap.items():
        module = wkey[: -len(".weight")]
        scales_cfg[module] = (int(_pattern_value(module, cfg.get("rank_pattern"), cfg["r"])),
                              float(_pattern_value(module, cfg.get("alpha_pattern"), cfg["lora_alpha"])))
    existing = dict(lora_modules(model))
    if not existing:
        for module in scales_cfg:
            try:
                lin = model.get_submodule(module)
            except AttributeError:
                raise AdapterError(f"{path}: adapter key {keymap[module + '.weight'][0]!r}: the model has no module "
                                   f"{module!r}") from None
            if not isinstance(lin, nn.Linear):
                raise AdapterError(f"{path}: adapter key {keymap[module + '.weight'][0]!r}: module {module!r} is "
                                   f"{type(lin).__name__}, not nn.Linear")
            _check_pair(*keymap[module + ".weight"], sd[keymap[module + ".weight"][0]],
                        sd[keymap[module + ".weight"][1]], (lin.out_features, lin.in_features))
        for p in model.parameters():
            p.requires_grad_(False)
        for module, (r, alpha) in scales_cfg.items():
            lin = model.get_submodule(module)
            new = LoRALinear.from_linear(lin, r, alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                                         use_rslora=bool(cfg.get("use_rslora", False)))
            _set_submodule(model, module, new)
        existing = dict(lora_modules(model))
    else:
        for module in scales_cfg:
            if module not in existing:
                raise AdapterError(f"{path}: adapter key {keymap[module + '.weight'][0]!r}: module {module!r} has no "
                                   f"LoRA in the model")
        if strict:
            missing = sorted(set(existing) - set(scales_cfg))
            if missing:
                raise AdapterError(f"{path}: adapter has no weights for LoRA module(s) {missing[:5]}"
                                   f"{' ...' if len(missing) > 5 else ''}")
    for module, (r, alpha) in scales_cfg.items():
        m = existing[module]
        akey, bkey = keymap[module + ".weight"]
        A, B = sd[akey], sd[bkey]
        if tuple(A.shape) != tuple(m.lora_A.shape):
            raise AdapterError(f"{path}: adapter key {akey!r} has shape {tuple(A.shape)}, the model's "
                               f"{module}.lora_A is {tuple(m.lora_A.shape)}")
        if tuple(B.shape) != tuple(m.lora_B.shape):
            raise AdapterError(f"{path}: adapter key {bkey!r} has shape {tuple(B.shape)}, the model's "
                               f"{module}.lora_B is {tuple(m.lora_B.shape)}")
        with torch.no_grad():
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
        m.lora_alpha = alpha
        m.use_rslora = bool(cfg.get("use_rslora", False))
        m.lora_dropout = float(cfg.get("lora_dropout", 0.0))
    return model

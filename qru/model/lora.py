"""LoRA adapters on a model: ``apply_lora`` (module swap), ``disable_adapters``, exact fp32 merge,
and PEFT-format adapter save/load.

``apply_lora`` replaces the targeted ``nn.Linear`` modules in place with
:class:`qru.model.lora_linear.LoRALinear`. Adapters are saved in PEFT's layout
(:mod:`qru.model.peft`), so an adapter trained here loads in peft and the reverse.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from qru.io import staged_dir, write_bytes, write_text
from qru.model.linear import Linear
from qru.model.lora_linear import LoRALinear
from qru.model.peft import (CONFIG_NAME, WEIGHTS_NAME, AdapterError, check_pair, map_adapter_keys, pattern_value,
                            peft_key, read_adapter)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        rr = int(pattern_value(name, rank_pattern, r))
        aa = float(pattern_value(name, alpha_pattern, alpha))
        new = LoRALinear.from_linear(lin, rr, aa, dropout=dropout, use_rslora=use_rslora, init=init,
                                     lora_dtype=lora_dtype, generator=gen)
        model.set_submodule(name, new)
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
def merge_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged model's state dict: HF key names, ``<module>.weight = W + s·B A`` (fp32 math,
    base dtype), no LoRA keys. The model is not modified; untouched tensors are shared, not copied."""
    mods = dict(lora_modules(model))
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    skip = ("lora_A", "lora_B", "qweight", "scales")
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
    order = {(k[: -len("qweight")] + "weight" if k.endswith(".qweight") else k): i for i, k in enumerate(sd)}
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
        model.set_submodule(name, lin)
    return model


# ----------------------------------------------------------------------------------------
# PEFT-format adapter files
# ----------------------------------------------------------------------------------------
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
        scales_cfg[module] = (int(pattern_value(module, cfg.get("rank_pattern"), cfg["r"])),
                              float(pattern_value(module, cfg.get("alpha_pattern"), cfg["lora_alpha"])))
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
            check_pair(*keymap[module + ".weight"], sd[keymap[module + ".weight"][0]],
                        sd[keymap[module + ".weight"][1]], (lin.out_features, lin.in_features))
        for p in model.parameters():
            p.requires_grad_(False)
        for module, (r, alpha) in scales_cfg.items():
            lin = model.get_submodule(module)
            new = LoRALinear.from_linear(lin, r, alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                                         use_rslora=bool(cfg.get("use_rslora", False)))
            model.set_submodule(module, new)
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

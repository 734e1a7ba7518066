"""PEFT adapter format: key names, ``adapter_config.json`` validation, reading an adapter, and
merging one into raw (possibly sharded) state dicts.

On disk adapters use PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight``), so an adapter trained here loads in peft and the
reverse. :func:`map_adapter_keys`, :func:`adapter_scales` and :func:`merge_state_dict` work on raw
tensors/state dicts for shard-by-shard merging; :func:`adapter_updates` is the one adapter loader
of merge-then-quantize and survival.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from qru.io import read_json
from qru.model.checkpoint import load_safetensors
from qru.model.lora_linear import lora_scale, merge_weight

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """A malformed adapter, or one that does not fit the model. The message names the key/field."""


def pattern_value(name: str, pattern: Mapping[str, object] | None, default):
    """peft's rank_pattern/alpha_pattern lookup: the first key that matches the end of ``name``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default



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
        r = int(pattern_value(module, cfg.get("rank_pattern"), cfg["r"]))
        if adapter_state_dict[akey].shape[0] != r:
            raise AdapterError(f"adapter key {akey!r} has rank {adapter_state_dict[akey].shape[0]} "
                               f"but the config says r={r}")
        alpha = float(pattern_value(module, cfg.get("alpha_pattern"), cfg["lora_alpha"]))
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
        check_pair(akey, bkey, A, B, tuple(W.shape))
        out[wkey] = merge_weight(W, A, B, scales[wkey])
    return out


def check_pair(akey, bkey, A, B, w_shape):
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
    cfg = _validate_config(read_json(cfg_path, AdapterError), str(cfg_path))
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


def adapter_updates(adapter: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]], base: str | os.PathLike
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The one adapter loader for merge-then-quantize and survival: base weight key → (A fp32, B fp32,
    scale) of the PEFT LoRA adapter at ``adapter`` (:func:`read_adapter`), checked against the tensor
    ``shapes`` of the base checkpoint ``base`` (named in errors)."""
    cfg, asd = read_adapter(adapter)
    scales = adapter_scales(asd, cfg)
    keymap = map_adapter_keys(asd.keys())
    for wkey, (akey, bkey) in keymap.items():
        if wkey not in shapes:
            raise AdapterError(f"adapter {adapter} does not fit {base}: adapter key {akey!r} targets "
                               f"{wkey!r}, which the base checkpoint does not have")
        if len(shapes[wkey]) != 2:
            raise AdapterError(f"adapter {adapter}: base tensor {wkey!r} has shape {shapes[wkey]}, not a linear weight")
        try:
            check_pair(akey, bkey, asd[akey], asd[bkey], shapes[wkey])
        except AdapterError as e:
            raise AdapterError(f"adapter {adapter} does not fit {base} (base tensor {wkey!r} has shape "
                               f"{shapes[wkey]}): {e}") from None
    return {w: (asd[a].float(), asd[b].float(), scales[w]) for w, (a, b) in keymap.items()}

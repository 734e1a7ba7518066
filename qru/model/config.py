"""``LlamaConfig``: a dataclass whose field names are Hugging Face ``config.json`` keys.

Reads both the transformers v4 layout (``torch_dtype``, ``rope_theta``, ``rope_scaling``)
and the v5 layout (``dtype``, ``rope_parameters``); writes the v4 layout, which both read.
Unknown keys are kept in ``extra``, reported with a warning, and written back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qru.io import read_json, write_text

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keys HF writes that carry no meaning for this implementation; accepted silently.
# Kept in ``extra`` and written back, but not warned about.
_KNOWN_INERT = {"architectures", "model_type", "transformers_version", "use_cache", "pretraining_tp",
                "attention_dropout", "_name_or_path", "output_attentions", "output_hidden_states",
                "return_dict", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder",
                "problem_type", "tokenizer_class", "tie_encoder_decoder", "torchscript"}
# Converted to their v4 equivalents on read.
_CONSUMED = {"dtype", "rope_parameters"}


# Keys other Llama-like configs carry that change the math; refused unless at their no-op value.
_MATH_KEYS = {"attention_dropout": (0, 0.0, None), "sliding_window": (None,),
              "use_sliding_window": (False, None), "partial_rotary_factor": (1, 1.0, None),
              "attn_logit_softcapping": (None,), "final_logit_softcapping": (None,), "logit_scale": (1, 1.0, None),
              "embedding_multiplier": (1, 1.0, None), "residual_multiplier": (1, 1.0, None),
              "attention_multiplier": (None,), "logits_scaling": (1, 1.0, None), "use_qk_norm": (False, None),
              "qk_layernorm": (False, None), "query_pre_attn_scalar": (None,), "layer_types": (None,),
              "no_rope_layers": (None,), "rope_interleaved": (False, None)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_number(name: str, v) -> None:
    if not (_is_number(v) and math.isfinite(v) and v > 0):
        raise ConfigError(f"config field {name!r} must be a positive finite number, got {v!r}")


class ConfigError(ValueError):
    """A malformed or inconsistent model config. The message names the field."""


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = "float32"
    initializer_range: float = 0.02
    quantization_config: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.num_attention_heads) and self.num_attention_heads > 0:
            if _is_int(self.hidden_size) and self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"config field 'num_attention_heads'={self.num_attention_heads} does not divide "
                                  f"'hidden_size'={self.hidden_size} (and no 'head_dim' is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads if _is_int(self.hidden_size) else None
        self.validate()

    # -- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        """Types and ranges of every field; raises :class:`ConfigError` naming the field."""
        for name in REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_key_value_heads'={self.num_key_value_heads} does not divide "
                f"'num_attention_heads'={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim'={self.head_dim} must be even for RoPE")
        for name in ("rms_norm_eps", "rope_theta"):
            _positive_number(name, getattr(self, name))
        v = self.initializer_range
        if not (_is_number(v) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"config field 'initializer_range' must be a finite number >= 0, got {v!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(f"config field {name!r} must be a JSON boolean (true / false), got {v!r}")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not _is_int(v):
                raise ConfigError(f"config field {name!r} must be an integer or null, got {v!r}")
        eos = self.eos_token_id
        if not (eos is None or _is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos))):
            raise ConfigError(f"config field 'eos_token_id' must be an integer, a list of integers or null, "
                              f"got {eos!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act'={self.hidden_act!r} is not supported (only 'silu')")
        if self.torch_dtype is not None and self.torch_dtype not in DTYPES:
            raise ConfigError(f"config field 'torch_dtype'={self.torch_dtype!r} is not one of {list(DTYPES)}")
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise ConfigError(f"config field 'quantization_config' must be an object, got {self.quantization_config!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"LlamaConfig.extra must be a dict, got {type(self.extra).__name__}")
        for key, inert in _MATH_KEYS.items():
            if key in self.extra and self.extra[key] not in inert:
                raise ConfigError(f"config field {key!r}={self.extra[key]!r} changes the model's math and is not "
                                  f"supported (only {' or '.join(map(json.dumps, inert))})")
        if self.rope_scaling is not None:
            self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if not isinstance(rs, dict):
            raise ConfigError(f"config field 'rope_scaling' must be an object, got {rs!r}")
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ROPE_TYPES:
            raise ConfigError(f"config field 'rope_scaling': unknown rope type {kind!r} "
                              f"(supported: {', '.join(ROPE_TYPES)})")
        needs = {"default": (), "linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for k in needs[kind]:
            if k not in rs:
                raise ConfigError(f"config field 'rope_scaling' of type {kind!r} is missing {k!r}")
        known = {"rope_type", "type", "rope_theta", *needs["llama3"]}
        for k, v in rs.items():
            if k not in known and not (k == "partial_rotary_factor" and v == 1):
                raise ConfigError(f"config field 'rope_scaling' key {k!r} is not supported for rope type {kind!r}")
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            if k in rs:
                _positive_number(f"rope_scaling.{k}", rs[k])
        if "original_max_position_embeddings" in rs:
            v = rs["original_max_position_embeddings"]
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"config field 'rope_scaling.original_max_position_embeddings' must be a "
                                  f"positive integer, got {v!r}")
        if kind == "llama3" and not rs["high_freq_factor"] > rs["low_freq_factor"]:
            raise ConfigError(f"config field 'rope_scaling': 'high_freq_factor'={rs['high_freq_factor']!r} must "
                              f"exceed 'low_freq_factor'={rs['low_freq_factor']!r}")

    # -- derived -----------------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype or "float32"]

    def num_parameters(self) -> int:
        h, i, L, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h

    # -- I/O ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "LlamaConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(map(repr, missing))}")
        if d.get("model_type", "llama") != "llama":
            raise ConfigError(f"{source}: 'model_type'={d['model_type']!r}, expected 'llama'")
        # transformers v5 layout
        rp = d.pop("rope_parameters", None)
        if rp is not None and not isinstance(rp, dict):
            raise ConfigError(f"{source}: config field 'rope_parameters' must be an object, got {rp!r}")
        if isinstance(rp, dict):
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            if rp.get("rope_type", rp.get("type", "default")) != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = rp
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _CONSUMED}
        unknown = sorted(k for k in extra if k not in _KNOWN_INERT and k not in _MATH_KEYS)
        if unknown:
            warnings.warn(f"{source}: unknown key(s) kept but not used: {', '.join(unknown)}")
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"model config not found: {path}")
        return cls.from_dict(read_json(path, ConfigError), source=str(path))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["quantization_config"] is None:
            del d["quantization_config"]
        d.update({k: v for k, v in self.extra.items() if k not in ("architectures", "model_type")})
        d.update(architectures=["LlamaForCausalLM"], model_type="llama")
        return dict(sorted(d.items()))

    def to_json(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # -- presets -----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        """Named sizes: ``tiny`` (tests), ``small`` (demo), ``llama2-7b`` (shapes only)."""
        presets = {
            "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
            "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
            "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                              max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="bfloat16"),
        }
        if name not in presets:
            raise ConfigError(f"unknown config preset {name!r} (known: {', '.join(presets)})")
        return cls(**{**presets[name], **overrides})


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`qru.io.write_text`)."""
    write_text(path, text)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (fp32, head_dim/2) with HF's rope_scaling rules."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = cfg.rope_type
    if kind == "linear":
        inv = inv / cfg.rope_scaling["factor"]
    elif kind == "llama3":
        rs = cfg.rope_scaling
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables ``cos, sin`` (B, T, head_dim) in ``dtype`` for ``position_ids`` (B, T), from
    :func:`rope_inv_freq` (computed in fp32)."""
    freqs = position_ids[:, :, None].float() * inv_freq.to(position_ids.device)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)

"""Read llama.cpp GGUF files (architecture ``llama``) into qru: config, weights, tokenizer.

The file format and the dequantizers are the ``gguf`` package's (llama.cpp's own Python reader and reference
code): ``gguf.GGUFReader`` memory-maps the file, ``gguf.quants.dequantize`` turns F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, Q4_K, Q6_K and MXFP4 blocks into fp32. llama.cpp's converter reorders the rows of ``attn_q`` /
``attn_k`` (``permute`` in convert_hf_to_gguf.py, from HF's rotate-half RoPE to GGML's interleaved pairs);
``unpermute_qk`` undoes it. A file without an ``output`` tensor ties ``lm_head`` to the embedding.

``load_gguf`` builds a model (``Llama.from_gguf``), ``gguf_tokenizer`` the tokenizer stored in the file,
``convert_gguf`` writes both as a Hugging Face checkpoint directory (``qru convert``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from qru.model.bpe_tokenizer import CONTROL, USER_DEFINED, BPETokenizer, byte_level_pre
from qru.model.checkpoint import assert_finite, save_state_dict
from qru.model.config import DTYPES, ConfigError, LlamaConfig
from qru.model.tokenizer import Tokenizer

SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q6_K,
                   QT.MXFP4)
# llama.cpp tensor names (without ``.weight``) -> HF module names
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm"}
CONVERT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class GGUFError(ValueError):
    """A GGUF file that cannot be read as a Llama. The message names the file and the tensor or key."""


def hf_name(name: str) -> str | None:
    """The HF parameter name of a llama.cpp tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None for a name outside the Llama layout."""
    base, dot, suffix = name.rpartition(".")
    if suffix != "weight" or not dot:
        return None
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.weight"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.weight"
    return None


def gguf_name(name: str) -> str:
    """The llama.cpp name of an HF Llama parameter name (the inverse of ``hf_name``)."""
    inv_top = {v: k for k, v in TOP_NAMES.items()}
    inv_layer = {v: k for k, v in LAYER_NAMES.items()}
    base = name.removesuffix(".weight")
    if base in inv_top:
        return f"{inv_top[base]}.weight"
    parts = base.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in inv_layer:
        return f"blk.{parts[2]}.{inv_layer[parts[3]]}.weight"
    raise KeyError(f"no GGUF name for parameter {name!r}")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter permutation of q/k rows: per head, (2, D/2) halves -> (D/2, 2) interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_qk``: GGUF q/k rows back to HF's rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape for a Llama with ``cfg`` (``lm_head`` only when untied)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    per = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
           "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
           "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    for n in range(cfg.num_hidden_layers):
        out.update({f"model.layers.{n}.{k}.weight": s for k, s in per.items()})
    return out


class GGUFFile:
    """An open GGUF file of a Llama: ``config()``, ``tensor(hf_name)``, ``state_dict()``, ``tokenizer()``.

    Opening checks the magic, the architecture, the tensor names, types and shapes (no tensor is
    dequantized yet), so a bad file fails before any expensive work."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError / IndexError / struct errors on a damaged file
            raise GGUFError(f"{self.path}: cannot read GGUF file ({type(e).__name__}: {e})") from e
        arch = self.get("general.architecture")
        if arch != "llama":
            raise GGUFError(f"{self.path}: architecture {arch!r} is not supported (general.architecture must "
                            f"be 'llama')")
        self.tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                hint = (" (llama.cpp's Llama-3.1 RoPE scaling factors; not supported)"
                        if t.name.startswith("rope_freqs") else "")
                raise GGUFError(f"{self.path}: unexpected tensor {t.name!r}{hint}")
            if t.tensor_type not in SUPPORTED_TYPES:
                raise GGUFError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which is not "
                                f"supported (supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
            self.tensors[name] = t
        self._config = self._read_config()
        want = expected_shapes(self._config)
        missing = [k for k in want if k not in self.tensors]
        if missing:
            names = ", ".join(repr(gguf_name(k)) for k in missing[:5])
            raise GGUFError(f"{self.path}: missing tensor(s) {names}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        extra = [k for k in self.tensors if k not in want]
        if extra:
            raise GGUFError(f"{self.path}: tensor {self.tensors[extra[0]].name!r} does not fit a "
                            f"{self._config.num_hidden_layers}-layer Llama (llama.block_count)")
        for k, shape in want.items():
            t = self.tensors[k]
            got = tuple(int(x) for x in reversed(t.shape.tolist()))
            if got != shape:
                raise GGUFError(f"{self.path}: tensor {t.name!r} has shape {got} (rows, cols), the metadata "
                                f"implies {shape}")

    # -- metadata ----------------------------------------------------------------------
    def get(self, key: str, default=None):
        """A metadata value (strings decoded, arrays as lists), or ``default`` when absent."""
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _need(self, key: str):
        v = self.get(key)
        if v is None:
            raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
        return v

    def _read_config(self) -> LlamaConfig:
        p = "llama."
        ints = {}
        for key in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                    "context_length"):
            v = self._need(p + key)
            if not isinstance(v, int):
                raise GGUFError(f"{self.path}: metadata key {p + key!r} must be one integer, got {v!r}")
            ints[key] = v
        heads = ints["attention.head_count"]
        kv = self.get(p + "attention.head_count_kv", heads)
        if not isinstance(kv, int):
            raise GGUFError(f"{self.path}: metadata key 'llama.attention.head_count_kv' must be one integer "
                            f"(per-layer head counts are not supported), got {kv!r}")
        hidden = ints["embedding_length"]
        head_dim = self.get(p + "attention.key_length", hidden // heads if heads else 0)
        if self.get(p + "attention.value_length", head_dim) != head_dim:
            raise GGUFError(f"{self.path}: llama.attention.value_length != key_length is not supported")
        rot = self.get(p + "rope.dimension_count", head_dim)
        if rot != head_dim:
            raise GGUFError(f"{self.path}: llama.rope.dimension_count={rot} != head dim {head_dim} (partial "
                            f"rotary embeddings are not supported)")
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else self.get(p + "vocab_size")
        if vocab is None and "model.embed_tokens.weight" in self.tensors:
            vocab = int(self.tensors["model.embed_tokens.weight"].shape[1])
        scaling = self._rope_scaling()
        ids = {k: self.get(f"tokenizer.ggml.{g}_token_id") for k, g in
               (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"))}
        try:
            return LlamaConfig(
                vocab_size=vocab, hidden_size=hidden, intermediate_size=ints["feed_forward_length"],
                num_hidden_layers=ints["block_count"], num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=head_dim, max_position_embeddings=ints["context_length"],
                rms_norm_eps=float(self._need(p + "attention.layer_norm_rms_epsilon")),
                rope_theta=float(self.get(p + "rope.freq_base", 10000.0)), rope_scaling=scaling,
                tie_word_embeddings="lm_head.weight" not in self.tensors, torch_dtype="float32", **ids)
        except ConfigError as e:
            raise GGUFError(f"{self.path}: {e}") from None

    def _rope_scaling(self) -> dict | None:
        p = "llama.rope."
        kind = self.get(p + "scaling.type")
        factor = self.get(p + "scaling.factor", self.get(p + "scale_linear"))
        if kind is None and factor is not None:
            kind = "linear"
        if kind in (None, "none") or (kind == "linear" and factor == 1.0):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        raise GGUFError(f"{self.path}: llama.rope.scaling.type {kind!r} is not supported (only 'linear')")

    def config(self, dtype: torch.dtype = torch.float32) -> LlamaConfig:
        """The model config, with ``torch_dtype`` set to ``dtype``."""
        return self._config.replace(torch_dtype={v: k for k, v in DTYPES.items()}[dtype])

    # -- tensors -----------------------------------------------------------------------
    def tensor(self, name: str, dtype: torch.dtype = torch.float32, check_finite: bool = True) -> torch.Tensor:
        """The HF parameter ``name``: dequantized (``gguf.quants.dequantize``, fp32), q/k rows un-permuted,
        cast to ``dtype``."""
        t = self.tensors[name]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
        cfg = self._config
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        if check_finite:
            assert_finite(t.name, w, f"{self.path}: ")
        return w.to(dtype)

    def state_dict(self, dtype: torch.dtype = torch.float32, check_finite: bool = True) -> dict[str, torch.Tensor]:
        """All parameters by HF name, in ``dtype`` (a tied model has no ``lm_head.weight``)."""
        return {k: self.tensor(k, dtype, check_finite) for k in expected_shapes(self._config)}

    def tokenizer(self) -> BPETokenizer:
        """The tokenizer stored in ``tokenizer.ggml.*`` (``gpt2`` byte-level BPE or ``llama`` SentencePiece)."""
        kind = self.get("tokenizer.ggml.model")
        if kind is None:
            raise GGUFError(f"{self.path}: no tokenizer in the file (metadata key 'tokenizer.ggml.model' is missing)")
        tokens = self._need("tokenizer.ggml.tokens")
        extra = {"model_max_length": self._config.max_position_embeddings}
        template = self.get("tokenizer.chat_template")
        if template is not None:
            extra["chat_template"] = template
        g = lambda k: self.get(f"tokenizer.ggml.{k}")  # noqa: E731
        try:
            return BPETokenizer.from_vocab(
                kind, tokens, merges=g("merges"), scores=g("scores"), token_types=g("token_type"), pre=g("pre"),
                bos_id=g("bos_token_id"), eos_id=g("eos_token_id"), pad_id=g("padding_token_id"),
                unk_id=g("unknown_token_id"), add_bos=g("add_bos_token"),
                add_space_prefix=g("add_space_prefix") if g("add_space_prefix") is not None else True,
                extra_config=extra, source=str(self.path))
        except ValueError as e:
            raise GGUFError(str(e) if str(self.path) in str(e) else f"{self.path}: {e}") from None


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype in CONVERT_DTYPES:
            return CONVERT_DTYPES[dtype]
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {list(CONVERT_DTYPES) + list(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES.values())}")
    return dtype


def load_gguf(cls, path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device="cpu",
              check_finite: bool = True):
    """Build ``cls`` (a Llama class) from a GGUF file, weights dequantized to ``dtype``."""
    dtype = _dtype(dtype)
    f = GGUFFile(path)
    config = f.config(dtype)
    with torch.device("meta"):
        model = cls(config)
    sd = {k: v.to(device) for k, v in f.state_dict(dtype, check_finite).items()}
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True, strict=True)
    model.tie_weights()
    return model


def gguf_tokenizer(path: str | os.PathLike) -> BPETokenizer:
    """The tokenizer stored in a GGUF file."""
    return GGUFFile(path).tokenizer()


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, dtype: str | torch.dtype = "fp32",
                 overwrite: bool = False, max_shard_size: int | str = "2GB") -> Path:
    """Write a GGUF Llama as an HF checkpoint directory: ``config.json``, safetensors, ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``. transformers loads it with ``from_pretrained(out)``.

    Built in a staging directory beside ``out`` and renamed into place. An existing non-empty ``out`` is
    refused unless ``overwrite`` (then replaced whole); ``out`` may not be the input's own directory.
    Peak memory: the model in ``dtype`` (the GGUF itself is memory-mapped).
    """
    src, out = Path(path), Path(out)
    dtype = _dtype(dtype)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if src.exists() and out.resolve() == src.resolve().parent:
        raise ValueError(f"output {out} is the directory of the input {src}; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty (pass overwrite / --overwrite to replace it)")
    f = GGUFFile(src)
    tok = f.tokenizer()
    cfg = f.config(dtype)
    if tok.vocab_size != cfg.vocab_size:
        raise GGUFError(f"{src}: the tokenizer has {tok.vocab_size} tokens, the model's vocab_size is "
                        f"{cfg.vocab_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        save_state_dict(f.state_dict(dtype), stage, max_shard_size,
                        metadata={"source": f"gguf:{src.name}"}, extra_files={"config.json": _config_json(cfg)})
        tok.save_pretrained(stage)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out


def _config_json(cfg: LlamaConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2) + "\n"


# -- writing (export) -------------------------------------------------------------------------------------

def _pre_name(pre_tokenizer_json: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name of a byte-level pre-tokenizer built by ``byte_level_pre``."""
    for name in ("gpt2", "smollm", "llama-bpe", "qwen2"):
        if json.loads(byte_level_pre(name, "").__getstate__()) == pre_tokenizer_json:
            return name
    raise GGUFError(f"the tokenizer's pre-tokenizer {pre_tokenizer_json!r} has no llama.cpp name")


def tokenizer_metadata(tok: Tokenizer | BPETokenizer) -> dict:
    """The ``tokenizer.ggml.*`` fields of a qru tokenizer: ``model``, ``tokens``, ``token_type``, ``merges`` /
    ``scores``, ``pre``, special ids, ``add_bos_token``.

    SentencePiece models become the ``llama`` kind (llama.cpp runs BPE over the whole text by the scores, so
    a model trained with ``split_by_whitespace`` may split whitespace runs differently there)."""
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "unknown_token_id": tok.unk_id}
    if isinstance(tok, Tokenizer):
        sp = tok.sp
        n = sp.get_piece_size()
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
                 5 if sp.is_unused(i) else 1 for i in range(n)]  # (user-defined pieces are not exposed: normal)
        pad = sp.pad_id()
        return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
                "scores": [sp.get_score(i) for i in range(n)], "token_type": types, "add_bos_token": True,
                "add_space_prefix": True, **ids, **({"padding_token_id": pad} if pad >= 0 else {})}
    d = json.loads(tok.tk.to_str())
    model = d["model"]
    added = {a["id"]: a for a in d.get("added_tokens", [])}
    n = tok.vocab_size
    tokens: list[str | None] = [None] * n
    for t, i in model["vocab"].items():
        tokens[i] = t
    for i, a in added.items():
        tokens[i] = a["content"]
    if None in tokens:
        raise GGUFError(f"{tok.source}: token id {tokens.index(None)} has no token (the vocabulary has holes)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    types = [(CONTROL if added[i]["special"] else USER_DEFINED) if i in added else 1 for i in range(n)]
    out = {"tokens": tokens, "token_type": types, "add_bos_token": tok.add_bos, **ids}
    if tok.has_pad:
        out["padding_token_id"] = tok.pad_id
    if model.get("byte_fallback"):  # the SentencePiece kind: scores that rank the merges
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        out.update(model="llama", scores=[-float(rank.get(t, len(merges))) for t in tokens],
                   add_space_prefix=d.get("normalizer") is not None and "Prepend" in json.dumps(d["normalizer"]))
        out["token_type"] = [6 if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else 2 if i == tok.unk_id else ty
                             for i, (t, ty) in enumerate(zip(tokens, out["token_type"]))]
    else:
        out.update(model="gpt2", merges=merges, pre=_pre_name(d.get("pre_tokenizer")))
    return {k: v for k, v in out.items() if not (k.endswith("_id") and v is not None and v < 0)}


FILE_TYPES = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
              QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
              QT.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
              QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, QT.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE}


def add_metadata(w: gguf.GGUFWriter, cfg: LlamaConfig, tok: Tokenizer | BPETokenizer, qtype, name: str) -> None:
    """Write the ``general.*``, ``llama.*`` and ``tokenizer.ggml.*`` keys llama.cpp's converter writes."""
    if cfg.attention_bias or cfg.mlp_bias:
        raise GGUFError(f"{name}: attention/MLP biases have no place in a llama GGUF")
    if cfg.rope_type not in ("default", "linear"):
        raise GGUFError(f"{name}: rope_scaling {cfg.rope_type!r} cannot be written (only linear)")
    w.add_name(name)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    meta = tokenizer_metadata(tok)
    if len(meta["tokens"]) != cfg.vocab_size:
        raise GGUFError(f"{name}: the tokenizer has {len(meta['tokens'])} tokens, the model's vocab_size is "
                        f"{cfg.vocab_size}")
    w.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["token_type"])
    if "merges" in meta:
        w.add_token_merges(meta["merges"])
    if "scores" in meta:
        w.add_token_scores(meta["scores"])
        w.add_add_space_prefix(meta["add_space_prefix"])
    for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                    ("unknown_token_id", w.add_unk_token_id), ("padding_token_id", w.add_pad_token_id)):
        if meta.get(key) is not None:
            fn(meta[key])
    w.add_add_bos_token(meta["add_bos_token"])
    template = getattr(tok, "extra_config", {}).get("chat_template")
    if template:
        w.add_chat_template(template)

"""The Hugging Face ``tokenizers`` kind, :class:`BPETokenizer` (``tokenizer.json`` +
``tokenizer_config.json``): byte-level (GPT-2 style, with llama.cpp's pre-tokenizer splits) or
SentencePiece-style with byte fallback, e.g. built from a GGUF file's vocabulary. Same interface as
:class:`qru.model.tokenizer.Tokenizer` (see :mod:`qru.model.tokenizer`)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers
import tokenizers.processors
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from qru.io import read_json, write_bytes
from qru.model.tokenizer_common import check_batch_args, pad_rows, plain_ids, wrap_ids

# Pre-tokenizer splits of byte-level vocabularies, by llama.cpp's ``tokenizer.ggml.pre`` name (llama-vocab.cpp).
_GPT2_SPLIT = None  # ByteLevel's own GPT-2 regex
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_PRE = {"default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "smollm": "smollm",
                  "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
                  "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2"}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (tokenizer.ggml.token_type)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level_pre(pre: str | None, source: str):
    kind = BYTE_LEVEL_PRE.get(pre or "default")
    if kind is None:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} is not supported "
                         f"(known: {', '.join(sorted(BYTE_LEVEL_PRE))})")
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "smollm":  # llama.cpp: "\p{N}" then the GPT-2 regex; HF: Digits(individual) + ByteLevel
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[kind]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces, best score first
    (ties: shorter left, then shorter right piece last, as ``transformers.generate_merges`` orders them)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` (``self.tk``) with Llama conventions; files ``tokenizer.json`` (the tokenizer),
    ``tokenizer_config.json`` (special tokens, ``add_bos_token``; what transformers' ``AutoTokenizer`` reads) and
    ``special_tokens_map.json``."""

    FILE_NAME = "tokenizer.json"
    CONFIG_NAME = "tokenizer_config.json"
    SPECIAL_MAP_NAME = "special_tokens_map.json"

    def __init__(self, tk: tokenizers.Tokenizer, bos: str | None, eos: str | None, pad: str | None = None,
                 unk: str | None = None, add_bos: bool = False, extra_config: dict | None = None,
                 source: str = "tokenizer"):
        self.tk = tk
        self.source = source
        self.extra_config = dict(extra_config or {})
        self._tokens = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
        ids = {}
        for name, tok in self._tokens.items():
            tid = tk.token_to_id(tok) if tok is not None else None
            if tok is not None and tid is None:
                raise ValueError(f"{source}: {name} {tok!r} is not in the vocabulary")
            ids[name] = -1 if tid is None else tid
        self._ids = ids
        self._add_bos = bool(add_bos)
        self._special = {i for i in (tk.token_to_id(t.content) for t in tk.get_added_tokens_decoder().values()
                                     if t.special) if i is not None} | {i for i in ids.values() if i >= 0}

    # -- building ----------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, kind: str, tokens: Sequence[str], *, merges: Sequence[str] | None = None,
                   scores: Sequence[float] | None = None, token_types: Sequence[int] | None = None,
                   pre: str | None = None, bos_id: int | None = None, eos_id: int | None = None,
                   pad_id: int | None = None, unk_id: int | None = None, add_bos: bool | None = None,
                   add_space_prefix: bool = True, extra_config: dict | None = None,
                   source: str = "tokenizer") -> "BPETokenizer":
        """Build from a vocabulary as GGUF stores it (``tokenizer.ggml.*``).

        ``kind="gpt2"``: byte-level BPE from ``tokens`` + ``merges`` (``"a b"`` strings), split by the ``pre``
        pre-tokenizer. ``kind="llama"``: SentencePiece BPE with byte fallback, merges derived from ``scores``.
        Tokens typed control (3) become special tokens, user-defined (4) added tokens.
        """
        n = len(tokens)
        for name, tid in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("unk", unk_id)):
            if tid is not None and not 0 <= tid < n:
                raise ValueError(f"{source}: {name} token id {tid} is outside the vocabulary of {n} tokens")
        types = list(token_types) if token_types is not None else [1] * n
        if len(types) != n:
            raise ValueError(f"{source}: {len(types)} token types for {n} tokens")
        if kind == "gpt2":
            if merges is None:
                raise ValueError(f"{source}: a gpt2 (byte-level BPE) vocabulary needs merges")
            spell = bytes_to_unicode()
            alphabet = set(spell.values())
            vocab = {}
            for i, t in enumerate(tokens):
                vocab.setdefault(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")), i)
            pairs = [tuple(m.split(" ")) for m in merges]
            bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
            if bad is not None:
                raise ValueError(f"{source}: malformed merge {bad!r} (expected two tokens separated by one space)")
            tk = tokenizers.Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
            tk.pre_tokenizer = byte_level_pre(pre, source)
            tk.decoder = decoders.ByteLevel()
            control = [t for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
            default_add_bos = False
        elif kind == "llama":
            if scores is None or len(scores) != n:
                raise ValueError(f"{source}: a llama (SentencePiece) vocabulary needs one score per token")
            vocab = {}
            for i, t in enumerate(tokens):
                vocab.setdefault(t, i)
            tk = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges_from_scores(tokens, scores), fuse_unk=True,
                                          byte_fallback=True,
                                          unk_token=tokens[unk_id] if unk_id is not None else None))
            # As sentencepiece and llama.cpp: spaces -> "\u2581", one prepended to every text (also one that starts
            # with a space; transformers' GGUF LlamaTokenizer, Metaspace(prepend_scheme="first"), skips it there).
            norm = [normalizers.Replace(" ", "\u2581")]
            if add_space_prefix:
                norm.insert(0, normalizers.Prepend("\u2581"))
            tk.normalizer = normalizers.Sequence(norm)
            seq = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            if add_space_prefix:
                seq.append(decoders.Strip(content=" ", left=1))
            tk.decoder = decoders.Sequence(seq)
            control = [t for t, ty in zip(tokens, types) if ty == CONTROL]
            default_add_bos = True
        else:
            raise ValueError(f"{source}: tokenizer model {kind!r} is not supported (known: 'gpt2', 'llama')")
        if control:
            tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and tk.token_to_id(t) is not None]
        if user:
            tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        name = lambda tid: tokens[tid] if tid is not None else None  # noqa: E731
        return cls(tk, name(bos_id), name(eos_id), name(pad_id), name(unk_id),
                   add_bos=default_add_bos if add_bos is None else add_bos, extra_config=extra_config,
                   source=source)

    # -- files -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "BPETokenizer":
        """Load ``directory/tokenizer.json`` with the special tokens of ``tokenizer_config.json`` beside it."""
        d = Path(directory)
        path = d / cls.FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {cls.FILE_NAME} in {directory}: {path} does not exist")
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ValueError(f"not a valid tokenizer.json: {path} ({e})") from e
        cfg_path = d / cls.CONFIG_NAME
        cfg = {}
        if cfg_path.is_file():
            cfg = read_json(cfg_path)
        tok = lambda k: cfg.get(k)["content"] if isinstance(cfg.get(k), dict) else cfg.get(k)  # noqa: E731
        extra = {k: v for k, v in cfg.items() if k in ("chat_template", "model_max_length", "add_eos_token")}
        out = cls(tk, tok("bos_token"), tok("eos_token"), tok("pad_token"), tok("unk_token"),
                  add_bos=bool(cfg.get("add_bos_token", False)), extra_config=extra, source=str(path))
        out.path = path
        return out

    def config_dict(self) -> dict:
        """``tokenizer_config.json``: what transformers' ``AutoTokenizer`` needs beside ``tokenizer.json``."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self._add_bos,
                "add_eos_token": False, "clean_up_tokenization_spaces": False,
                **{k: v for k, v in self._tokens.items() if v is not None}, **self.extra_config}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``, each atomically.

        ``tokenizer.json`` carries a post-processor that prepends bos when ``add_bos``, so transformers'
        ``AutoTokenizer(directory)(text)`` gives the same ids as ``encode(text, bos=True)``."""
        d = Path(directory)
        tk = tokenizers.Tokenizer.from_str(self.tk.to_str())
        if self._add_bos and self.bos_id >= 0:
            bos = self._tokens["bos_token"]
            tk.post_processor = tokenizers.processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])
        write_bytes(d / self.FILE_NAME, tk.to_str().encode())
        write_bytes(d / self.CONFIG_NAME, (json.dumps(self.config_dict(), indent=2) + "\n").encode())
        special = {k: v for k, v in self._tokens.items() if v is not None}
        write_bytes(d / self.SPECIAL_MAP_NAME, (json.dumps(special, indent=2) + "\n").encode())
        return d / self.FILE_NAME

    def digest(self) -> str:
        """SHA-256 of the tokenizer and its special tokens (a cache key)."""
        h = hashlib.sha256(self.tk.to_str().encode())
        h.update(json.dumps([self._tokens, self._add_bos], sort_keys=True).encode())
        return h.hexdigest()

    # -- interface ---------------------------------------------------------------------
    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def unk_id(self) -> int:
        return self._ids["unk_token"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos_token"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos_token"]

    @property
    def has_pad(self) -> bool:
        """Whether the model names a pad token (else ``pad_id`` is ``eos_id``)."""
        return self._ids["pad_token"] >= 0

    @property
    def pad_id(self) -> int:
        """The pad id, or ``eos_id`` when the model has no pad token."""
        return self._ids["pad_token"] if self.has_pad else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return wrap_ids(self, self.tk.encode(text, add_special_tokens=False).ids, bos, eos)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode ids to text, skipping special tokens such as bos/eos/pad."""
        return self.tk.decode(plain_ids(self, ids), skip_special_tokens=False)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     padding_side: str = "left", max_len: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``Tokenizer.encode_batch``: ``(ids, attention_mask)``, both (B, T) int64."""
        check_batch_args(texts, padding_side, max_len)
        rows = [wrap_ids(self, e.ids, bos, eos) for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]
        return pad_rows(rows, self.pad_id, padding_side, max_len)

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, add_bos={self.add_bos}, source={self.source!r})")


"""Tokenizers with one interface: ``encode`` / ``decode`` / ``encode_batch`` / ``vocab_size`` and the
``bos_id`` / ``eos_id`` / ``pad_id`` / ``unk_id`` ids; ``load_tokenizer`` picks the kind beside a model.

- ``Tokenizer``: SentencePiece (``tokenizer.model``) with Llama conventions: load, train (BPE), encode/decode,
  batch padding. Special ids of models trained here: unk=0 ``<unk>``, bos=1 ``<s>``, eos=2 ``</s>``, pad=3
  ``<pad>``. Special-token strings inside text are encoded literally (as bytes), never as control ids.
- ``BPETokenizer``: a Hugging Face ``tokenizers`` BPE (``tokenizer.json`` + ``tokenizer_config.json``), byte-level
  (GPT-2 style) or SentencePiece-style with byte fallback, e.g. built from a GGUF file's vocabulary. Control
  tokens written in the text (``<|im_end|>``) are matched as those tokens, as transformers and llama.cpp do.

``encode(text, bos=True)`` marks the start of a sequence: ``bos_id`` is prepended when the model uses one
(``add_bos``; every SentencePiece model here does, a GGUF vocabulary says so in ``tokenizer.ggml.add_bos_token``).
A model with no pad token pads with ``eos_id``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

import sentencepiece as spm
import tokenizers
import tokenizers.processors
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from qru.io import write_bytes

_N_SPECIAL = 4  # unk, bos, eos, pad
_N_BYTES = 256  # byte-fallback pieces <0x00>..<0xFF>

# Llama-style trainer settings; `Tokenizer.train(**trainer_kwargs)` overrides any of them.
_TRAINER_DEFAULTS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=3,
    unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    character_coverage=0.99995,
    max_sentence_length=16384,  # Llama used 4192; longer lines are silently dropped by the trainer
    hard_vocab_limit=False,  # small corpora: vocab may end up below vocab_size instead of failing
    num_threads=1,  # determinism
    minloglevel=2,
)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`qru.io.write_bytes`)."""
    write_bytes(path, data)


def _plain_ids(tok, ids: Sequence[int] | torch.Tensor) -> list[int]:
    """``ids`` (a list or 1-D tensor) as ints, checked against the vocabulary, without ``tok``'s
    special (control) ids: what either tokenizer kind decodes."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    n = tok.vocab_size
    out = []
    for i in ids:
        i = int(i)
        if not 0 <= i < n:
            raise ValueError(f"token id {i} out of range for vocab_size={n}")
        if i not in tok._special:
            out.append(i)
    return out


def _sentences(items: list[str | os.PathLike], errors: list[Exception]) -> Iterator[str]:
    """Yield non-blank lines from texts (str) and files (PathLike, UTF-8, one sentence per line).

    A read error is appended to ``errors`` (and ends the stream) so it is not swallowed by the C++ trainer.
    """
    for item in items:
        if isinstance(item, str):
            yield from (ln for ln in item.split("\n") if ln.strip())
            continue
        try:
            with open(item, encoding="utf-8") as f:
                yield from (ln.rstrip("\n") for ln in f if ln.strip())
        except (OSError, UnicodeDecodeError) as e:
            errors.append(ValueError(f"cannot read training file {item}: {e}"))
            return


class Tokenizer:
    """A loaded SentencePiece model (``tokenizer.model``); ``self.sp`` is the raw processor."""

    FILE_NAME = "tokenizer.model"

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model file not found: {path}")
        self._init_proto(path.read_bytes(), source=str(path))
        self.path = path

    def _init_proto(self, proto: bytes, source: str) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"not a valid sentencepiece model: {source} ({e})") from e
        self.sp = sp
        self._proto = proto
        self._special = {i for i in range(sp.get_piece_size()) if sp.is_control(i)}

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load ``directory/tokenizer.model``."""
        path = Path(directory) / cls.FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {cls.FILE_NAME} in {directory}: {path} does not exist")
        return cls(path)

    @classmethod
    def train(cls, texts_or_files: Iterable[str | os.PathLike] | str | os.PathLike, vocab_size: int,
              out_path: str | os.PathLike, seed: int = 0, **trainer_kwargs) -> "Tokenizer":
        """Train a byte-fallback, digit-splitting BPE model in-process and write it atomically to ``out_path``.

        ``texts_or_files``: ``str`` items are texts (split on newlines), ``os.PathLike`` items (e.g. ``Path``)
        are UTF-8 files with one sentence per line. Same input + seed + kwargs gives a byte-identical file.
        With ``hard_vocab_limit=False`` (default) a small corpus may yield fewer than ``vocab_size`` pieces;
        read ``.vocab_size`` for the real size. ``trainer_kwargs`` override the Llama-style defaults.
        Note ``seed`` sets sentencepiece's process-global RNG.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        min_vocab = _N_SPECIAL + _N_BYTES + 1
        if vocab_size < min_vocab:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-fallback BPE needs at least "
                             f"{min_vocab} ({_N_SPECIAL} special + {_N_BYTES} byte pieces + characters)")
        if isinstance(texts_or_files, (str, os.PathLike)):
            texts_or_files = [texts_or_files]
        items = list(texts_or_files)
        for it in items:
            if not isinstance(it, (str, os.PathLike)):
                raise TypeError(f"texts_or_files items must be str texts or os.PathLike files, got "
                                f"{type(it).__name__}")
            if not isinstance(it, str) and not Path(it).is_file():
                raise FileNotFoundError(f"training file not found: {it}")
        read_errors: list[Exception] = []
        sentences = _sentences(items, read_errors)
        first = next(sentences, None)
        if read_errors:
            raise read_errors[0]
        if first is None:
            files = [str(it) for it in items if not isinstance(it, str)]
            raise ValueError("training corpus texts_or_files is empty (no non-blank lines)"
                             + (f"; files: {files}" if files else ""))

        writer = io.BytesIO()
        args = {**_TRAINER_DEFAULTS, **trainer_kwargs}
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=chain([first], sentences), model_writer=writer,
                                           vocab_size=vocab_size, **args)
        except RuntimeError as e:
            if read_errors:
                raise read_errors[0] from e
            msg = str(e)
            m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
            if m:
                raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: it needs at least "
                                 f"{m.group(2)} (special + byte + character pieces); raise vocab_size or lower "
                                 f"character_coverage") from e
            if "sentences_.empty()" in msg:
                raise ValueError("training corpus texts_or_files has no usable sentences (all lines longer "
                                 f"than max_sentence_length={args['max_sentence_length']} bytes?)") from e
            if "vocab_size" in msg.lower():
                raise ValueError(f"vocab_size={vocab_size} rejected by the trainer: {msg}") from e
            raise
        if read_errors:  # the trainer saw a truncated corpus
            raise read_errors[0]
        _atomic_write_bytes(Path(out_path), writer.getvalue())
        return cls(out_path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model proto atomically to ``path``."""
        path = Path(path)
        _atomic_write_bytes(path, self._proto)
        return path

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.model`` atomically."""
        return self.save(Path(directory) / self.FILE_NAME)

    def digest(self) -> str:
        """SHA-256 of the model proto (a cache key)."""
        return hashlib.sha256(self._proto).hexdigest()

    @property
    def add_bos(self) -> bool:
        """SentencePiece Llama models start every sequence with ``<s>``."""
        return True

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The ``<pad>`` id, or ``eos_id`` when the model has no pad piece."""
        pad = self.sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self._wrap(self.sp.encode(text, out_type=int), bos, eos)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return _wrap(self, ids, bos, eos)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode ids to text, skipping special (control) ids such as bos/eos/pad."""
        return self.sp.decode(_plain_ids(self, ids))

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     padding_side: str = "left", max_len: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad to the longest row (capped at ``max_len``) -> ``(ids, attention_mask)``, both (B, T) int64.

        Padding uses ``pad_id`` with mask 0. Rows longer than ``max_len`` are truncated: left padding keeps the
        LAST ``max_len`` tokens (the end of a prompt, bos may be cut), right padding keeps the FIRST ``max_len``.
        """
        _check_batch_args(texts, padding_side, max_len)
        rows = [self._wrap(r, bos, eos) for r in self.sp.encode(list(texts), out_type=int)]
        return _pad_rows(rows, self.pad_id, padding_side, max_len)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, path={str(getattr(self, 'path', None))!r})")


def _check_batch_args(texts, padding_side, max_len) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a sequence of str")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")


def _wrap(tok, ids: list[int], bos: bool, eos: bool) -> list[int]:
    """``ids`` with ``bos_id`` in front (when asked and the model uses one) and ``eos_id`` behind (when asked)."""
    bos = bos and tok.add_bos
    for flag, name, tid in ((bos, "bos", tok.bos_id), (eos, "eos", tok.eos_id)):
        if flag and tid < 0:
            raise ValueError(f"{name}=True but the model has no {name} piece")
    return ([tok.bos_id] if bos else []) + ids + ([tok.eos_id] if eos else [])


def _pad_rows(rows: list[list[int]], pad_id: int, padding_side: str, max_len: int | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    if max_len is not None:
        rows = [r[-max_len:] if padding_side == "left" else r[:max_len] for r in rows]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r, dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask


# -- BPE kind (Hugging Face ``tokenizers``) ------------------------------------------------------------

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


def _byte_level_pre(pre: str | None, source: str):
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
            tk.pre_tokenizer = _byte_level_pre(pre, source)
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
            try:
                cfg = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: malformed JSON ({e})") from None
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
        _atomic_write_bytes(d / self.FILE_NAME, tk.to_str().encode())
        _atomic_write_bytes(d / self.CONFIG_NAME, (json.dumps(self.config_dict(), indent=2) + "\n").encode())
        special = {k: v for k, v in self._tokens.items() if v is not None}
        _atomic_write_bytes(d / self.SPECIAL_MAP_NAME, (json.dumps(special, indent=2) + "\n").encode())
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
        return _wrap(self, self.tk.encode(text, add_special_tokens=False).ids, bos, eos)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode ids to text, skipping special tokens such as bos/eos/pad."""
        return self.tk.decode(_plain_ids(self, ids), skip_special_tokens=False)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     padding_side: str = "left", max_len: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``Tokenizer.encode_batch``: ``(ids, attention_mask)``, both (B, T) int64."""
        _check_batch_args(texts, padding_side, max_len)
        rows = [_wrap(self, e.ids, bos, eos) for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]
        return _pad_rows(rows, self.pad_id, padding_side, max_len)

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, add_bos={self.add_bos}, source={self.source!r})")


TOKENIZER_FILES = (BPETokenizer.FILE_NAME, Tokenizer.FILE_NAME)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | BPETokenizer:
    """The tokenizer of a model: ``tokenizer.json`` (BPE kind) or ``tokenizer.model`` (SentencePiece) in a
    directory, or either file given directly. A directory holding both uses ``tokenizer.json``."""
    p = Path(path)
    if p.is_dir():
        if (p / BPETokenizer.FILE_NAME).is_file():
            return BPETokenizer.from_dir(p)
        if (p / Tokenizer.FILE_NAME).is_file():
            return Tokenizer(p / Tokenizer.FILE_NAME)
        raise FileNotFoundError(f"no tokenizer in {p}: neither {BPETokenizer.FILE_NAME} nor {Tokenizer.FILE_NAME}")
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    if p.suffix == ".json":
        if p.name != BPETokenizer.FILE_NAME:
            raise ValueError(f"{p}: a BPE tokenizer file must be named {BPETokenizer.FILE_NAME} (its "
                             f"{BPETokenizer.CONFIG_NAME} sits beside it)")
        return BPETokenizer.from_dir(p.parent)
    return Tokenizer(p)

"""Tokenizers with one interface: ``encode`` / ``decode`` / ``encode_batch`` / ``vocab_size`` and the
``bos_id`` / ``eos_id`` / ``pad_id`` / ``unk_id`` ids; ``load_tokenizer`` picks the kind beside a model.

- ``Tokenizer``: SentencePiece (``tokenizer.model``) with Llama conventions: load, train (BPE), encode/decode,
  batch padding. Special ids of models trained here: unk=0 ``<unk>``, bos=1 ``<s>``, eos=2 ``</s>``, pad=3
  ``<pad>``. Special-token strings inside text are encoded literally (as bytes), never as control ids.
- ``BPETokenizer`` (:mod:`qru.model.bpe_tokenizer`): a Hugging Face ``tokenizers`` BPE (``tokenizer.json`` +
  ``tokenizer_config.json``), byte-level (GPT-2 style) or SentencePiece-style with byte fallback, e.g. built from a
  GGUF file's vocabulary. Control tokens written in the text (``<|im_end|>``) are matched as those tokens, as
  transformers and llama.cpp do.

``encode(text, bos=True)`` marks the start of a sequence: ``bos_id`` is prepended when the model uses one
(``add_bos``; every SentencePiece model here does, a GGUF vocabulary says so in ``tokenizer.ggml.add_bos_token``).
A model with no pad token pads with ``eos_id``.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
import sentencepiece as spm
import torch

from qru.io import write_bytes
from qru.model.bpe_tokenizer import BPETokenizer
from qru.model.tokenizer_common import check_batch_args, pad_rows, plain_ids, wrap_ids

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
        write_bytes(Path(out_path), writer.getvalue())
        return cls(out_path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model proto atomically to ``path``."""
        path = Path(path)
        write_bytes(path, self._proto)
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
        return wrap_ids(self, ids, bos, eos)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode ids to text, skipping special (control) ids such as bos/eos/pad."""
        return self.sp.decode(plain_ids(self, ids))

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     padding_side: str = "left", max_len: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad to the longest row (capped at ``max_len``) -> ``(ids, attention_mask)``, both (B, T) int64.

        Padding uses ``pad_id`` with mask 0. Rows longer than ``max_len`` are truncated: left padding keeps the
        LAST ``max_len`` tokens (the end of a prompt, bos may be cut), right padding keeps the FIRST ``max_len``.
        """
        check_batch_args(texts, padding_side, max_len)
        rows = [self._wrap(r, bos, eos) for r in self.sp.encode(list(texts), out_type=int)]
        return pad_rows(rows, self.pad_id, padding_side, max_len)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, path={str(getattr(self, 'path', None))!r})")



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

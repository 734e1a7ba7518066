"""Forget / retain / pre-training data: read from local paths (:func:`qru.data.read_records`), tokenize
once (cached on disk), batch with deterministic, resumable shuffling.

Formats (``fmt``):
- ``text``: documents, each chunked into ``max_len`` windows (``bos`` + up to ``max_len-1`` tokens,
  ``eos`` after the last chunk of a document), loss on every token. Sources: a ``.txt`` file (one
  document), a directory in the MUSE layout (``DIR/raw/*.txt``, or ``DIR/*.txt``), or JSON / JSON Lines
  records with a ``text`` field (or a JSON array of strings).
- ``qa``: JSON / JSON Lines records with ``question`` and ``answer`` (TOFU, MUSE KnowMem), formatted by
  :func:`qru.data.format_qa` (``Question: {question}\\nAnswer: {answer}``) + ``eos``; the loss covers the answer tokens (and ``eos``)
  only with ``qa_loss="answer"``, every token with ``qa_loss="all"``.
- ``auto``: ``qa`` when records have ``question`` and ``answer``, else ``text``.

The token cache key is (file content hash, tokenizer model hash, max_len, format, qa_loss); the cache
lives in ``$QRU_CACHE`` or ``~/.cache/qru/tokens`` unless a ``cache_dir`` is given.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from qru.data import DataError, format_qa, qa_prompt
from qru.data import read_records as _read_source
from qru.data.records import text_files
from qru.io import write_bytes

FORMATS = ("auto", "text", "qa")
QA_LOSS = ("answer", "all")
_CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    env = os.environ.get("QRU_CACHE")
    return Path(env) / "tokens" if env else Path.home() / ".cache" / "qru" / "tokens"


# -- tokenized storage --------------------------------------------------------------------

@dataclass
class TokenizedSet:
    """Variable-length examples stored flat: ``ids``/``mask`` (int32/uint8) cut by ``offsets``.

    ``mask[t] = 1`` marks token ``t`` as a target; position 0 of an example never is.
    """
    ids: torch.Tensor
    mask: torch.Tensor
    offsets: torch.Tensor
    name: str = ""

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_targets(self) -> int:
        return int(self.mask.sum())

    def max_id(self) -> int:
        return int(self.ids.max()) if self.ids.numel() else -1

    @classmethod
    def from_examples(cls, examples: list[tuple[list[int], list[int]]], name: str = "") -> "TokenizedSet":
        lens = torch.tensor([0] + [len(e[0]) for e in examples], dtype=torch.int64)
        flat_ids = [t for e in examples for t in e[0]]
        flat_mask = [t for e in examples for t in e[1]]
        return cls(torch.tensor(flat_ids, dtype=torch.int32), torch.tensor(flat_mask, dtype=torch.uint8),
                   lens.cumsum(0), name)

    @classmethod
    def concat(cls, sets: list["TokenizedSet"], name: str = "") -> "TokenizedSet":
        if len(sets) == 1:
            return sets[0] if not name else cls(sets[0].ids, sets[0].mask, sets[0].offsets, name)
        offs, base = [torch.zeros(1, dtype=torch.int64)], 0
        for s in sets:
            offs.append(s.offsets[1:] + base)
            base += s.num_tokens
        return cls(torch.cat([s.ids for s in sets]), torch.cat([s.mask for s in sets]), torch.cat(offs),
                   name or "+".join(s.name for s in sets))

    def subset(self, indices: list[int] | torch.Tensor, name: str | None = None) -> "TokenizedSet":
        return TokenizedSet.from_examples(
            [(self.example(int(i))[0].tolist(), self.example(int(i))[1].tolist()) for i in indices],
            self.name if name is None else name)


# -- reading ------------------------------------------------------------------------------

def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a local data source (:func:`qru.data.read_records`): ``[{"text": ...}]`` for
    text sources, the JSON objects (``{"text": s}`` for a string) for JSON / JSON Lines."""
    return [{"text": r} if isinstance(r, str) else r for r in _read_source(path, allow_str=True)]


def detect_format(records: list[dict], path: Path | str) -> str:
    keys = set(records[0])
    if {"question", "answer"} <= keys:
        return _check_strings(records, ("question", "answer"), path, "qa")
    if "text" in keys:
        return _check_strings(records, ("text",), path, "text")
    raise DataError(f"{path}: records have fields {sorted(keys)}; expected 'question' and 'answer' (QA) "
                    "or 'text' (documents)")


def _check_strings(records: list[dict], fields: tuple[str, ...], path, kind: str) -> str:
    for i, r in enumerate(records):
        for f in fields:
            if not isinstance(r.get(f), str):
                raise DataError(f"{path}: record {i} field {f!r} is {r.get(f)!r}, not a string")
    return kind


# -- tokenizing ---------------------------------------------------------------------------

def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_qa(records: list[dict], tokenizer, max_len: int, qa_loss: str = "answer", source: str = ""
                ) -> tuple[list[tuple[list[int], list[int]]], int]:
    """``(examples, dropped)``: each record as :func:`qru.data.format_qa` + eos, truncated to ``max_len``.

    Rows whose answer is cut off entirely by ``max_len`` are dropped and counted.
    """
    out, dropped = [], 0
    for i, r in enumerate(records):
        q, a = r.get("question"), r.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            raise DataError(f"{source}: record {i} needs string fields 'question' and 'answer', got "
                            f"{type(q).__name__} and {type(a).__name__}")
        full = tokenizer.encode(format_qa(q, a), bos=True, eos=True)
        if qa_loss == "all":
            k = 1
        else:
            k = _common_prefix(full, tokenizer.encode(qa_prompt(q), bos=True))
        ids = full[:max_len]
        if len(ids) <= max(k, 1):
            dropped += 1
            continue
        out.append((ids, [0] * k + [1] * (len(ids) - k)))
    return out, dropped


def tokenize_text(texts: list[str], tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Each document as ``bos`` + tokens + ``eos``, split into chunks of ``max_len`` (each starting with ``bos``,
    for a tokenizer whose model uses one: ``add_bos``)."""
    head = [tokenizer.bos_id] if tokenizer.add_bos else []
    step = max_len - len(head)
    out = []
    for t in texts:
        toks = tokenizer.encode(t, bos=False, eos=True)
        for s in range(0, len(toks), step):
            chunk = head + toks[s:s + step]
            out.append((chunk, [0] + [1] * (len(chunk) - 1)))
    return out


def _content_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = text_files(path) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    return tokenizer.digest()


def load_tokens(path: str | os.PathLike, tokenizer, max_len: int, fmt: str = "auto", qa_loss: str = "answer",
                cache_dir: str | os.PathLike | None = None, name: str | None = None) -> TokenizedSet:
    """Tokenize one data source (or load it from the cache)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if qa_loss not in QA_LOSS:
        raise DataError(f"qa_loss must be one of {QA_LOSS}, got {qa_loss!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise DataError(f"max_len must be an int >= 2, got {max_len!r}")
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    name = name or path.name
    key = hashlib.sha256("|".join([_CACHE_VERSION, _content_hash(path), tokenizer_hash(tokenizer), str(max_len),
                                   fmt, qa_loss]).encode()).hexdigest()[:32]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cfile = cache / f"{key}.safetensors"
    if cfile.exists():
        try:
            t = load_file(str(cfile))
            return TokenizedSet(t["ids"], t["mask"], t["offsets"], name)
        except Exception as e:  # a corrupt cache entry is rebuilt, not fatal
            warnings.warn(f"token cache entry {cfile} unreadable ({e}); rebuilding")
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    kind = detect_format(records, path) if fmt == "auto" else fmt
    if kind == "qa":
        missing = [k for k in ("question", "answer") if k not in records[0]]
        if missing:
            raise DataError(f"{path}: QA format needs fields 'question' and 'answer'; missing {missing}")
        examples, dropped = tokenize_qa(records, tokenizer, max_len, qa_loss, str(path))
        if dropped:
            warnings.warn(f"{path}: {dropped} QA record(s) dropped: max_len={max_len} cuts off the whole answer")
    else:
        if "text" not in records[0]:
            raise DataError(f"{path}: text format needs a 'text' field; records have {sorted(records[0])}")
        examples = tokenize_text([r["text"] for r in records if isinstance(r.get("text"), str)], tokenizer,
                                 max_len)
    if not examples:
        raise DataError(f"{path}: no usable examples after tokenization (max_len={max_len})")
    ts = TokenizedSet.from_examples(examples, name)
    cache.mkdir(parents=True, exist_ok=True)
    write_bytes(cfile, save({"ids": ts.ids, "mask": ts.mask, "offsets": ts.offsets},
                            metadata={"source": str(path), "format": kind, "max_len": str(max_len), "qa_loss": qa_loss}))
    return ts


def load_sets(paths, tokenizer, max_len: int, fmt: str = "auto", qa_loss: str = "answer", cache_dir=None,
              role: str = "data") -> TokenizedSet:
    """Tokenize and concatenate several sources; ``role`` (e.g. ``"forget"``) names the set in errors."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DataError(f"no {role} data given")
    sets = []
    for p in paths:
        try:
            sets.append(load_tokens(p, tokenizer, max_len, fmt, qa_loss, cache_dir))
        except DataError as e:
            raise DataError(f"{role} set: {e}") from None
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{role} set: {e}") from None
    ts = TokenizedSet.concat(sets, name=role)
    if len(ts) == 0:
        raise DataError(f"{role} set is empty: {[str(p) for p in paths]}")
    if ts.max_id() >= tokenizer.vocab_size:
        raise DataError(f"{role} set: token id {ts.max_id()} >= tokenizer vocab_size {tokenizer.vocab_size}")
    return ts


# -- batching -----------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded with pad_id
    loss_mask: torch.Tensor  # (B, T) 1 = target token
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    index: torch.Tensor  # (B,) example indices into the TokenizedSet
    # This batch's share of its global batch's rows / target tokens: 1.0 in one process; a rank's
    # chunk under data parallelism (qru.train.distributed.split_batch). Losses are weighted by them.
    row_share: float = 1.0
    token_share: float = 1.0

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.loss_mask.to(device), self.attention_mask.to(device),
                     self.index, self.row_share, self.token_share)


def collate(ts: TokenizedSet, indices, pad_id: int, multiple: int = 1) -> Batch:
    """Right-pad the chosen examples to the longest, rounded up to a ``multiple`` of tokens. With
    right padding and causal attention the real tokens never see padding, so the model can run
    without an attention mask."""
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    rows = [ts.example(int(i)) for i in idx]
    width = max(len(r[0]) for r in rows)
    width = -(-width // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    lm = torch.zeros((len(rows), width), dtype=torch.int64)
    am = torch.zeros((len(rows), width), dtype=torch.int64)
    for b, (x, m) in enumerate(rows):
        n = len(x)
        ids[b, :n] = x
        lm[b, :n] = m
        am[b, :n] = 1
    return Batch(ids, lm, am, idx)


def fixed_sample(n_total: int, n: int, seed: int) -> list[int]:
    """A held-fixed random subset of ``min(n, n_total)`` example indices, sorted."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=g)[:n].tolist())


class BatchStream:
    """Endless, resumable stream of index batches: a fresh seeded permutation each epoch.

    The order depends only on ``(seed, epoch)``; the state is ``(epoch, pos)``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if n <= 0:
            raise DataError("cannot batch an empty data set")
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order: list[torch.Tensor] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def order(self, epoch: int) -> list[torch.Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        return list(perm.split(self.batch_size))

    def next(self) -> torch.Tensor:
        if self._order is None:
            self._order = self.order(self.epoch)
        out = self._order[self.pos]
        self.pos += 1
        if self.pos == len(self._order):
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None

"""The one reader of local data files (training sets, evaluation sets, calibration text).

Sources: a ``.txt`` file (one document), a directory of ``.txt`` documents (``DIR/raw/*.txt``, the
MUSE layout, or ``DIR/*.txt``), a JSON list (``[...]``) or JSON Lines file (``.json`` / ``.jsonl``).
Every problem raises :class:`DataError` naming the file, the item and the field.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from qru.data.qa import format_qa

DATA_SUFFIXES = (".txt", ".json", ".jsonl")


class DataError(ValueError):
    """Unusable data. The message names the file, the item and the field."""


def text_files(path: Path) -> list[Path]:
    """The ``*.txt`` documents of a directory: ``DIR/raw/*.txt`` if that exists, else ``DIR/*.txt``."""
    root = path / "raw" if (path / "raw").is_dir() else path
    files = sorted(root.glob("*.txt"))
    if not files:
        raise DataError(f"{path}: directory has no *.txt documents (looked in {root})")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: Path, what: str) -> list:
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: empty file (expected a non-empty list of {what})")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
    else:
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: empty list (expected at least one of {what})")
    return data


def read_records(path: str | os.PathLike, fields: Sequence[str] = (), *, allow_str: bool = False,
                 what: str = "records") -> list:
    """The records of a data source, checked.

    ``.txt`` / a directory: ``[{"text": document}]`` (whitespace-only documents dropped). JSON / JSON
    Lines: the items, each an object holding ``fields`` as strings (or lists of strings) or, with
    ``allow_str``, a plain string. Raises FileNotFoundError for a missing path and :class:`DataError`
    for anything else (unknown file type, bad encoding, malformed JSON, no records, a missing or
    non-string field)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir() or path.suffix == ".txt":
        files = text_files(path) if path.is_dir() else [path]
        data = [{"text": t} for t in map(_read_text, files) if t.strip()]
        if not data:
            raise DataError(f"{path}: no text (empty file(s))")
    elif path.suffix in (".json", ".jsonl"):
        data = _read_json(path, what)
    else:
        raise DataError(f"{path}: unknown data file type {path.suffix!r} (expected .txt, .json, .jsonl or a "
                        "directory of .txt files)")
    for i, item in enumerate(data):
        if allow_str and isinstance(item, str):
            continue
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} is a {type(item).__name__}, expected an object"
                            + (" or a string" if allow_str else "") + (f" with keys {list(fields)}" if fields else ""))
        for k in fields:
            if k not in item:
                raise DataError(f"{path}: item {i} has no field {k!r} (fields: {sorted(item)})")
            v = item[k]
            if not isinstance(v, str) and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
                raise DataError(f"{path}: item {i} field {k!r} must be a string, got {type(v).__name__}")
    return data


def record_text(record, where: str) -> str:
    """The text of one record: a string, ``text``, ``question`` + ``answer`` (:func:`format_qa`) or
    ``prompt`` (+ ``gt``)."""
    r = record
    if isinstance(r, str):
        return r
    if isinstance(r, dict) and isinstance(r.get("text"), str):
        return r["text"]
    if isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str):
        return format_qa(r["question"], r["answer"])
    if isinstance(r, dict) and isinstance(r.get("prompt"), str):
        return r["prompt"] + (r["gt"] if isinstance(r.get("gt"), str) else "")
    raise DataError(f"{where} has no text (expected a string or a 'text', 'question'+'answer' or 'prompt' field)")


def read_texts(path: str | os.PathLike) -> list[str]:
    """Every text of a source, in order (:func:`record_text` of each record): a ``.txt`` file, a JSON /
    JSON Lines file, or a directory: its ``raw/*.txt`` or ``*.txt`` if any, else every ``*.json`` /
    ``*.jsonl`` below it (MUSE layout; ``meta.json`` excluded), sorted by path. Empty texts are dropped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        root = path / "raw" if (path / "raw").is_dir() else path
        files = sorted(root.glob("*.txt")) or sorted(
            p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.name != "meta.json")
        if not files:
            raise DataError(f"directory {path} has no .txt, .json or .jsonl files")
    else:
        files = [path]
    texts: list[str] = []
    for f in files:
        recs = read_records(f, allow_str=True, what="texts")
        texts += [record_text(r, f"{f}: record {i}") for i, r in enumerate(recs)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{path} has no text")
    return texts

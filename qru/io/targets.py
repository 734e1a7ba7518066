"""Checks every writing command runs before any work starts: the output is not an input, does not
hold or sit inside one, is empty or ``overwrite`` was given, and can be written; the device exists.
Imports nothing from qru above :mod:`qru.io`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from qru.io.atomic import OutputError


class UnsafeOutputError(OutputError):
    """An output that would overwrite, contain or sit inside an input, or replace an output unasked."""


class DeviceError(ValueError):
    """A ``device`` that torch cannot parse or that is not available."""


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _inside(a: Path, b: Path) -> bool:
    """``a`` lies strictly inside ``b``."""
    return a != b and b in a.parents


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (str, os.PathLike)):
        return [v]
    return [x for x in v if x is not None]


def check_output(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | Iterable | None] = (), *,
                 overwrite: bool = False, kind: str = "dir", option: str = "--out",
                 may_sit_inside: Iterable[str] = ()) -> Path:
    """Refuse an unsafe ``out`` before any work starts; returns it as a Path.

    ``inputs`` maps a role ("model", "adapter", "data", ...) to a path or a list of paths (symlinks are
    resolved). Refused: ``out`` is an input, lies inside one or contains one; an existing non-empty
    ``out`` (``kind="dir"``) or existing file (``kind="file"``) without ``overwrite``; a file where a
    directory is expected or the reverse; a location that cannot be created or written. A file output
    may sit inside the directory of a role in ``may_sit_inside`` (e.g. ``muse.json`` beside the model)
    as long as it does not replace a file there.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    if out is None or str(out) == "":
        raise UnsafeOutputError(f"{option}: an output path is required")
    out = Path(out)
    ro = _real(out)
    for role, paths in dict(inputs).items():
        for p in _as_list(paths):
            rp = _real(p)
            if ro == rp:
                raise UnsafeOutputError(f"{option} {out} is the input {role} {p}; choose another output")
            if _inside(rp, ro):
                raise UnsafeOutputError(f"{option} {out} contains the input {role} {p}; choose another output")
            if _inside(ro, rp) and not (kind == "file" and role in may_sit_inside and not os.path.lexists(ro)):
                raise UnsafeOutputError(f"{option} {out} lies inside the input {role} {p}; choose another output")
    if os.path.lexists(out):
        if kind == "dir":
            if not out.is_dir():
                raise UnsafeOutputError(f"{option} {out} exists and is not a directory")
            if any(out.iterdir()) and not overwrite:
                raise UnsafeOutputError(f"{option} {out} exists and is not empty; pass --overwrite (overwrite=True) "
                                        "to replace it (it stays intact until the new output is complete)")
        else:
            if out.is_dir():
                raise UnsafeOutputError(f"{option} {out} is a directory; give a file path")
            if not overwrite:
                raise UnsafeOutputError(f"{option} {out} exists; pass --overwrite (overwrite=True) to replace it")
    # writability: the nearest existing ancestor must be a writable directory
    anc = out.absolute().parent
    while not os.path.lexists(anc):
        anc = anc.parent
    if not anc.is_dir():
        raise UnsafeOutputError(f"{option} {out}: {anc} is a file, so the output directory cannot be created")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UnsafeOutputError(f"{option} {out}: {anc} is not writable")
    return out


def check_device(name: str, option: str = "--device"):
    """``torch.device(name)`` (``"auto"`` allowed), refusing an unknown device or CUDA without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"{option} {name!r} is not a valid device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option} {name!r}: CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{option} {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta") and not (dev.type == "mps" and torch.backends.mps.is_available()):
        raise DeviceError(f"{option} {name!r}: device type {dev.type!r} is not available")
    return dev

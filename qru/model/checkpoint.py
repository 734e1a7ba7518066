"""Hugging Face checkpoint layout: ``config.json`` plus ``model.safetensors`` or shards with
``model.safetensors.index.json``.

Reading memory-maps each file and validates its header against the file size, so a
truncated or corrupt file is named in the error instead of crashing later. Writing goes
through :mod:`qru.io`: a complete staged directory committed with one atomic rename.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from qru.io import fault_point, staged_dir
from qru.model.config import DTYPES, LlamaConfig
from qru.quant.layout import CheckpointError, assert_finite, swap_in_quantized  # the layer below; re-exported

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}


# -- safetensors reading ------------------------------------------------------------------

def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The parsed JSON header and the byte offset where tensor data starts.

    Validated in full, as the safetensors format requires: a JSON object whose entries each have
    a known ``dtype``, a ``shape`` of non-negative ints and ``data_offsets`` ``[begin, end]``
    (non-negative, begin <= end, the size the shape and dtype need), the entries tiling the data
    section exactly (no gap, no overlap, nothing past the end of the file); ``__metadata__`` a
    str -> str object. Anything else raises :class:`CheckpointError` naming the file and tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header (header length {n}, file {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise CheckpointError(f"{path}: corrupt safetensors header ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                              "expected an object)")
    start = 8 + n
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise CheckpointError(f"{path}: corrupt safetensors header ('__metadata__' must map strings to strings)")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(shape, list)
                and all(_is_uint(d) for d in shape) and isinstance(offsets, list) and len(offsets) == 2
                and all(_is_uint(o) for o in offsets)):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {str(info)[:200]} "
                                  "(needs dtype, shape of non-negative ints, data_offsets [begin, end])")
        if info["dtype"] not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, not one of "
                                  f"{', '.join(ST_DTYPES)}")
        begin, end = offsets
        if begin > end:
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] (begin > end)")
        need = math.prod(shape) * torch.empty(0, dtype=ST_DTYPES[info["dtype"]]).element_size()
        if end - begin != need:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape "
                                  f"{shape} and dtype {info['dtype']} need {need}")
        if start + end > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {start + end} "
                                  f"but the file has {size} bytes")
        spans.append((begin, end, name))
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = (f"overlaps tensor {prev!r}" if begin < pos else
                    f"leaves a gap of {begin - pos} bytes after {prev!r}" if prev else f"starts at {begin}, not 0")
            raise CheckpointError(f"{path}: tensor {name!r} (data_offsets [{begin}, {end}]) {what}")
        pos, prev = end, name
    if start + pos != size:
        raise CheckpointError(f"{path}: {size - start - pos} bytes after the last tensor's data "
                              "(corrupt or not a safetensors file)")
    return header, start


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Memory-map a safetensors file: the tensors share pages with the file (copy-on-write)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    header, start = read_safetensors_header(path)
    out: dict[str, torch.Tensor] = {}
    if len(header) == (1 if "__metadata__" in header else 0):
        return out
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, begin = ST_DTYPES[info["dtype"]], info["data_offsets"][0]
        n = math.prod(info["shape"])
        if n == 0:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=n, offset=start + begin)
        out[name] = t.view(info["shape"])
    return out


class ShardReader:
    """Read one tensor at a time from a safetensors file with ``pread`` (no mmap), so a
    streaming pass over a large checkpoint holds about one tensor in memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header, self.start = read_safetensors_header(self.path)
        self.metadata = self.header.pop("__metadata__", None) or {}

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        if name not in self.header:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        info = self.header[name]
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path}: truncated file while reading tensor {name!r}")
        dtype = ST_DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).view(info["shape"])


def _check_shard_name(index: Path, name: str) -> None:
    """An index may only name files of its own directory: a plain file name, no path. (A shard
    that is itself a symlink is allowed: Hugging Face's hub cache links every file to a blob.)"""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or Path(name).name != name):
        raise CheckpointError(f"{index}: shard name {name!r} is not a file name inside {index.parent} "
                              "(paths are refused)")


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index}: malformed index ({type(e).__name__}: {str(e)[:200]})") from None
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise CheckpointError(f"{index}: malformed index ('weight_map' must be a non-empty object mapping "
                                  "tensor names to shard file names)")
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            _check_shard_name(index, f)
            if not (path / f).is_file():
                raise CheckpointError(f"{index}: lists shard {f!r}, which is missing from {path}")
        return [path / f for f in files]
    if (path / SINGLE).exists():
        return [path / SINGLE]
    raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX}")


def iter_shards(path: str | os.PathLike) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yield ``(file, tensors)`` one shard at a time (memory-mapped), for streaming transforms."""
    for f in checkpoint_files(path):
        yield f, load_safetensors(f)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, memory-mapped."""
    sd: dict[str, torch.Tensor] = {}
    for f, tensors in iter_shards(path):
        dup = sd.keys() & tensors.keys()
        if dup:
            raise CheckpointError(f"{f}: tensor {sorted(dup)[0]!r} also appears in another shard")
        sd.update(tensors)
    return sd


def checkpoint_shapes(path: str | os.PathLike, expected: dict[str, tuple[int, ...]]
                      ) -> tuple[list[ShardReader], dict[str, tuple[int, ...]]]:
    """Headers only (no tensor data read): a :class:`ShardReader` per shard of the checkpoint
    directory ``path`` (an unquantized checkpoint) and every tensor's shape, checked against ``expected``
    (name -> shape): no tensor twice, none unexpected, none missing, every shape as expected, every
    dtype floating-point. Errors name the tensor."""
    where = f"{path}: "
    readers = [ShardReader(f) for f in checkpoint_files(path)]
    shapes: dict[str, tuple[int, ...]] = {}
    for r in readers:
        for k in r.keys():
            if k in shapes:
                raise CheckpointError(f"{r.path}: tensor {k!r} also appears in another shard")
            shapes[k] = r.shape(k)
            if not ST_DTYPES[r.header[k]["dtype"]].is_floating_point:
                raise CheckpointError(f"{r.path}: tensor {k!r} has dtype {r.header[k]['dtype']}, expected a "
                                      "floating-point weight")
    for k, s in shapes.items():
        if k not in expected:
            raise CheckpointError(f"{where}unexpected tensor {k!r}")
        if s != tuple(expected[k]):
            raise CheckpointError(f"{where}tensor {k!r} has shape {s}, the config expects {tuple(expected[k])}")
    missing = sorted(expected.keys() - shapes.keys())
    if missing:
        raise CheckpointError(f"{where}missing tensor {missing[0]!r}")
    return readers, shapes


# -- writing ------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """``"2GB"``, ``"500MB"``, ``"10KiB"`` or an int, in bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r} (expected e.g. '2GB', '500MB')")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0] if unit != "B" else "B"]
    return int(float(m.group(1)) * base ** power)


def write_state_dict(sd: dict[str, torch.Tensor], stage: Path, max_shard_size: int | str = "2GB",
                     metadata: dict[str, str] | None = None, extra_files: dict[str, str] | None = None) -> None:
    """Write tensors in HF's (sharded) safetensors layout into the directory ``stage`` as it is (no
    commit: ``stage`` is a stage or an unpublished work directory)."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        used += nbytes
    meta = {"format": "pt", **(metadata or {})}
    stage = Path(stage)
    if len(shards) == 1:
        save_file(shards[0], str(stage / SINGLE), metadata=meta)
        fault_point(f"shard {stage / SINGLE}")
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(stage / fname), metadata=meta)
            fault_point(f"shard {stage / fname}")
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (stage / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                               "weight_map": weight_map}, indent=2))
    for fname, text in (extra_files or {}).items():
        (stage / fname).write_text(text)


def _not_weights(name: str) -> bool:
    """Files of a checkpoint directory that a new save of the weights does not replace (tokenizer,
    README, ...): everything but the old shards and index, which would shadow the new ones."""
    return not (name.startswith("model") and (name.endswith(".safetensors") or name == INDEX))


def save_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike, max_shard_size: int | str = "2GB",
                    metadata: dict[str, str] | None = None, extra_files: dict[str, str] | None = None) -> None:
    """Write tensors in HF's (sharded) safetensors layout to the directory ``path``, committed
    atomically (:func:`qru.io.staged_dir`): in an existing ``path`` the weights, index and the
    ``extra_files`` are replaced in one rename and its other files (a tokenizer) are kept."""
    with staged_dir(path, keep=_not_weights) as stage:
        write_state_dict(sd, stage, max_shard_size, metadata, extra_files)


def pretrained_files(model, sd: dict[str, torch.Tensor] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict (tied ``lm_head.weight`` omitted as HF does) and ``config.json`` text to save.
    ``sd``: the model's state dict as gathered elsewhere (a sharded model's), else ``model.state_dict()``."""
    sd = dict(model.state_dict() if sd is None else sd)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    dtype = next(iter(sd.values())).dtype
    name = {v: k for k, v in DTYPES.items()}.get(dtype, model.config.torch_dtype)
    cfg = model.config.replace(torch_dtype=name)
    return sd, {"config.json": json.dumps(cfg.to_dict(), indent=2) + "\n"}


def write_pretrained(model, stage: str | os.PathLike, max_shard_size: int | str = "2GB") -> None:
    """``config.json`` plus safetensors into the directory ``stage`` as it is (no commit)."""
    sd, extra = pretrained_files(model)
    write_state_dict(sd, Path(stage), max_shard_size, extra_files=extra)


def save_pretrained(model, path: str | os.PathLike, max_shard_size: int | str = "2GB") -> None:
    """``config.json`` plus safetensors, committed atomically to ``path`` (other files there are kept)."""
    sd, extra = pretrained_files(model)
    save_state_dict(sd, path, max_shard_size, extra_files=extra)


# -- model loading ------------------------------------------------------------------------

def _names(keys, k=5) -> str:
    keys = sorted(keys)
    return ", ".join(map(repr, keys[:k])) + (f" and {len(keys) - k} more" if len(keys) > k else "")


def load_pretrained(cls, path, dtype=None, device="cpu", check_finite: bool = True):
    """Build ``cls`` on the meta device and assign the checkpoint's tensors to it."""
    path = Path(path)
    config = LlamaConfig.from_json(path / "config.json") if path.is_dir() else None
    if config is None:
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or config.dtype
    sd = load_state_dict(path)
    with torch.device("meta"):
        model = cls(config)
    if config.quantization_config:
        # quantized checkpoint (bitsandbytes nf4/fp4 or qru int layouts): swap QuantLinear modules
        # in, built from the packed tensors; ``dtype`` is their compute dtype
        swap_in_quantized(model, sd, config, dtype, device, check_finite, f"{path}: ")
    loaded = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    expected = {k: v for k, v in model.state_dict().items() if v.is_meta}
    if config.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {_names(unexpected)}")
    for name, ref in expected.items():
        t = sd[name]
        if ref.is_floating_point() != t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                                  f"expected a floating-point weight")
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, the config "
                                  f"expects {tuple(ref.shape)}")
        if check_finite:
            assert_finite(name, t, f"{path}: ")
        sd[name] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    model.load_state_dict({**sd, **loaded}, assign=True, strict=True)
    model.tie_weights()
    model.config = config.replace(torch_dtype={v: k for k, v in DTYPES.items()}[dtype])
    return model

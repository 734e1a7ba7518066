"""Quantized checkpoints: merge-then-quantize export (``qru quantize``) and loading.

:func:`quantize_checkpoint` streams a Hugging Face checkpoint shard by shard and tensor by
tensor (``ShardReader``: one tensor read at a time), merges a PEFT LoRA adapter into each
targeted weight in fp32, quantizes it, and writes output shards as they fill, all inside a
staging directory that replaces ``out`` only when everything succeeded. Peak memory is about
one output shard plus one tensor (and its fp32 copy).

On-disk layouts (docs/formats.md, "Checkpoint layout"):

* nf4 / fp4: bitsandbytes' serialization (``<module>.weight`` uint8 ``(n/2, 1)``,
  ``.absmax``, ``.quant_map``, nested ``.nested_absmax`` / ``.nested_quant_map``, and
  ``.quant_state.bitsandbytes__<fmt>`` JSON bytes), ``quantization_config`` with
  ``quant_method: bitsandbytes``: transformers loads it pre-quantized;
* int4 / int4_sym / int8: qru's (``<module>.weight`` packed, ``.scales``, ``.zeros``) with
  ``quant_method: qru``.

Non-quantized tensors are stored in the compute dtype. The layout itself (:func:`pack_tensors`,
and the loading half used by ``Llama.from_pretrained``) is :mod:`qru.quant.layout`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qru.io import check_output, fault_point, staged_dir
from qru.kernels import quant4
from qru.model.checkpoint import INDEX, ST_DTYPES, checkpoint_shapes, parse_size
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.model.lora import adapter_updates, merge_weight
from qru.quant.formats import FORMATS, quantize
from qru.quant.layout import CheckpointError, assert_finite, pack_tensors
from qru.quant.qlinear import (_as_tuple, dtype_name, parse_compute_dtype, quantization_config, resolve_block_size,
                               split_linears)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


# ----------------------------------------------------------------------------------------
# Streaming export
# ----------------------------------------------------------------------------------------
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class _ShardWriter:
    """Write safetensors shards tensor by tensor, holding no tensor after ``add`` returns.

    A safetensors file is ``u64 header length | JSON header | data``, and the header (names,
    dtypes, shapes, offsets) must come first. Each tensor's bytes are appended to a data file
    as it arrives; when a shard reaches ``limit`` bytes its header is written to the shard
    file and the data file is copied behind it in 16 MiB chunks. Memory stays at one tensor
    whatever the shard size (``save_file`` would hold the whole shard, twice).
    """

    def __init__(self, stage: Path, limit: int):
        self.stage, self.limit = stage, limit
        self.header: dict[str, dict] = {}
        self.used = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.data = None

    def _data_path(self) -> Path:
        return self.stage / f".shard-{len(self.files) + 1:05d}.data"

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.header and self.used + nbytes > self.limit:
            self.flush()
        if self.data is None:
            self.data = open(self._data_path(), "wb")
        for k, t in tensors.items():
            if t.dtype not in _ST_NAMES:
                raise TypeError(f"tensor {k!r}: dtype {t.dtype} cannot be stored in safetensors")
            n = t.numel() * t.element_size()
            if n:
                self.data.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            self.header[k] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.used, self.used + n]}
            self.used += n
        self.total += nbytes

    def flush(self) -> None:
        if not self.header:
            return
        data_path = self._data_path()
        self.data.close()
        self.data = None
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        path = self.stage / f".shard-{len(self.files) + 1:05d}.safetensors"
        with open(path, "wb") as f, open(data_path, "rb") as d:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            shutil.copyfileobj(d, f, 16 << 20)
            f.flush()
            os.fsync(f.fileno())
        data_path.unlink()
        fault_point(f"quantized shard {path}")
        self.files.append((path, list(self.header)))
        self.header, self.used = {}, 0

    def close(self) -> None:
        """Flush, name the shards ``model-i-of-n.safetensors`` and write the index."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (path, keys) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.stage / final)
            weight_map.update({k: final for k in keys})
        (self.stage / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                    "weight_map": weight_map}, indent=2))

    def abort(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None


def _check_output(tensors: dict[str, torch.Tensor], key: str, source: torch.Tensor, compute_dtype: torch.dtype,
                  path: Path) -> None:
    """Refuse to write a NaN/Inf: ``source`` (finite) must fit ``compute_dtype``, in which it is stored
    (non-quantized) or dequantized (quantized: its scales bound the values), and the packed tensors
    must be finite."""
    if source.is_floating_point() and source.numel():
        big = float(source.detach().abs().max())
        limit = torch.finfo(compute_dtype).max
        if big > limit:
            name = dtype_name(compute_dtype)
            what = "values" if key in tensors else "dequantized values"
            raise CheckpointError(
                f"{path}: tensor {key!r}: its {what} overflow {name} (max |value| {big:.4g} > {limit:.4g}); use "
                f"--compute-dtype {'bf16 or fp32' if compute_dtype == torch.float16 else 'fp32'}")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name!r}: quantizing {key!r} gives non-finite values")


def quantize_checkpoint(model_dir: str | os.PathLike, out: str | os.PathLike, fmt: str, block_size: int | None = None,
                        *, adapter: str | os.PathLike | None = None, skip=("lm_head",), double_quant: bool = False,
                        compute_dtype: torch.dtype | str = torch.bfloat16, max_shard_size: int | str = "2GB",
                        progress: bool = False, overwrite: bool = False) -> Path:
    """Merge ``adapter`` (PEFT LoRA, fp32 math) into ``model_dir``'s weights and quantize every
    ``nn.Linear`` weight not matched by ``skip`` to ``fmt``; write the checkpoint to ``out``.

    Quantization starts from the merged fp32 weight (no adapter: the stored weight as is).
    Everything else is cast to ``compute_dtype``. Tokenizer files are copied. Inputs and ``out`` are
    validated before anything is read or written (``out`` must not be, hold or sit inside the model
    or adapter; an existing non-empty ``out`` needs ``overwrite``); the result is staged beside
    ``out`` and committed with one atomic rename (:mod:`qru.io`), so an existing ``out`` stays
    loadable until the new one is complete. Returns ``out``.
    """
    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "int8" and block_size is not None:
        raise ValueError(f"block size {block_size} does not apply to int8 (one scale per output channel)")
    bs = resolve_block_size(fmt, block_size)
    if double_quant and fmt not in quant4.FORMATS_4BIT:
        raise ValueError(f"double quantization applies to nf4/fp4 only, not {fmt!r}")
    compute_dtype = parse_compute_dtype(compute_dtype)
    limit = parse_size(max_shard_size)
    check_output(out, {"model": model_dir, "adapter": adapter}, overwrite=overwrite)
    config = LlamaConfig.from_json(model_dir)
    if config.quantization_config:
        raise ValueError(f"{model_dir} is already quantized ({config.quantization_config.get('quant_method')})")

    # headers only: names, shapes, the module structure
    with torch.device("meta"):
        meta = Llama(config)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    readers, shapes = checkpoint_shapes(model_dir, expected)
    targets, skipped = split_linears(meta, _as_tuple(skip))
    if config.tie_word_embeddings and any(n == "lm_head" for n, _ in targets):
        raise ValueError(f"{model_dir}: lm_head is tied to model.embed_tokens (tie_word_embeddings), so it cannot "
                         "be quantized separately from the embeddings; keep lm_head in --skip (no --quantize-head)")
    for name, lin in targets:
        if fmt in ("int4", "int4_sym") and lin.in_features % 2:
            raise ValueError(f"{name}: in_features={lin.in_features} is odd; {fmt} needs it even "
                             f"(skip this module or use nf4/fp4/int8)")
    target_keys = {f"{n}.weight": n for n, _ in targets}
    merges = adapter_updates(adapter, shapes, model_dir) if adapter is not None else {}

    with staged_dir(out) as stage:
        writer = _ShardWriter(stage, limit)
        bar = tqdm(total=len(shapes), disable=not progress, unit="tensor", desc=f"quantize {fmt}")
        try:
            for r in readers:
                for key in r.keys():
                    t = r.get(key)
                    if t.is_floating_point():
                        assert_finite(key, t, f"{r.path}: ")
                    if key in merges:
                        A, B, s = merges[key]
                        t = merge_weight(t.float(), A, B, s)  # fp32, kept fp32 for quantization
                        if not bool(torch.isfinite(t).all()):
                            raise CheckpointError(f"adapter {adapter}: merging it into tensor {key!r} of "
                                                  f"{model_dir} overflows float32 (the adapter is too large)")
                    if key in target_keys:
                        q = quantize(t, fmt, bs, double_quant=double_quant)
                        tensors = pack_tensors(target_keys[key], q, compute_dtype)
                    else:
                        tensors = {key: t.to(compute_dtype) if t.is_floating_point() else t}
                    _check_output(tensors, key, t, compute_dtype, r.path)
                    writer.add(tensors)
                    del t
                    bar.update()
                    bar.set_postfix_str(key, refresh=False)
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        writer.close()
        cfg = config.replace(torch_dtype=dtype_name(compute_dtype),
                             quantization_config=quantization_config(fmt, bs, double_quant, compute_dtype, skipped))
        (stage / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, stage / name)
    return out

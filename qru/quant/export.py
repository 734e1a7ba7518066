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

Non-quantized tensors are stored in the compute dtype. :func:`swap_in_quantized` is the
loading half, used by ``Llama.from_pretrained``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch

from qru.io import check_output, fault_point, staged_dir
from qru.kernels import quant4
from qru.model.checkpoint import INDEX, ST_DTYPES, CheckpointError, assert_finite, checkpoint_shapes, parse_size
from qru.quant.formats import DOUBLE_QUANT_BLOCK, FORMATS, DoubleQuant, QTensor, quantize
from qru.quant.qlinear import (QuantLinear, _as_tuple, dtype_name, parse_compute_dtype,
                               quantization_config, resolve_block_size, split_linears)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
_BNB_STATE_KEYS = ("quant_type", "blocksize", "dtype", "shape")
_BNB_NESTED_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")


# ----------------------------------------------------------------------------------------
# Layout: QTensor <-> named tensors
# ----------------------------------------------------------------------------------------
def pack_tensors(module: str, q: QTensor, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear ``module`` (weight only; bias separate).

    nf4/fp4 follow bitsandbytes' ``QuantState.as_dict(packed=True)`` exactly; the state's
    ``dtype`` is the compute dtype (what bitsandbytes dequantizes to)."""
    w = f"{module}.weight"
    if q.fmt in quant4.FORMATS_4BIT:
        state = {"quant_type": q.fmt, "blocksize": q.block_size, "dtype": dtype_name(compute_dtype),
                 "shape": list(q.shape)}
        out = {w: q.data.reshape(-1, 1), f"{w}.absmax": q.scales,
               f"{w}.quant_map": quant4.codebook(q.fmt, q.device).clone()}
        dq = q.double_quant
        if dq is not None:
            out[f"{w}.nested_absmax"] = dq.absmax2
            out[f"{w}.nested_quant_map"] = dq.code.clone()
            state.update(nested_blocksize=dq.block_size, nested_dtype="float32", nested_offset=float(dq.offset.item()))
        out[f"{w}.quant_state.bitsandbytes__{q.fmt}"] = torch.tensor(list(json.dumps(state).encode("utf-8")),
                                                                     dtype=torch.uint8)
        return out
    rows, cols = q.shape
    if q.fmt == "int8":
        out = {w: q.data.view(torch.int8).reshape(rows, cols), f"{w}.scales": q.scales.reshape(rows)}
    else:
        out = {w: q.data.reshape(rows, cols // 2), f"{w}.scales": q.scales.reshape(rows, -1)}
        if q.fmt == "int4":
            out[f"{w}.zeros"] = q.zeros.reshape(rows, -1)
    return out


def _take(sd: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{where}missing tensor {key!r}")
    return sd[key]


def _expect(cond: bool, where: str, key: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}tensor {key!r} {what}")


def unpack_tensors(module: str, sd: Mapping[str, torch.Tensor], fmt: str, shape: tuple[int, int],
                   block_size: int | None = None, where: str = "", check_finite: bool = True
                   ) -> tuple[QTensor, list[str]]:
    """The :class:`QTensor` of ``module`` from checkpoint tensors, and the keys it used.
    ``block_size``: the qru layout's group (from ``quantization_config``); bnb states carry theirs."""
    w = f"{module}.weight"
    out_f, in_f = shape
    n = out_f * in_f
    data = _take(sd, w, where)
    if fmt in quant4.FORMATS_4BIT:
        skey = f"{w}.quant_state.bitsandbytes__{fmt}"
        if skey not in sd:
            others = [k for k in sd if k.startswith(f"{w}.quant_state.")]
            raise CheckpointError(f"{where}missing tensor {skey!r}" + (f" (found {others[0]!r})" if others else ""))
        try:
            state = json.loads(bytes(sd[skey].to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{where}tensor {skey!r} is not a JSON quant state ({e})") from None
        _expect(state.get("quant_type") == fmt, where, skey, f"says quant_type {state.get('quant_type')!r}, "
                f"the config says {fmt!r}")
        _expect(list(state.get("shape") or []) == [out_f, in_f], where, skey,
                f"says shape {state.get('shape')}, the model expects {[out_f, in_f]}")
        bs = state.get("blocksize")
        _expect(bs in quant4.BLOCK_SIZES, where, skey, f"has an unsupported blocksize {bs!r}")
        _expect(data.dtype == torch.uint8 and data.numel() == (n + 1) // 2, where, w,
                f"is {data.dtype} with {data.numel()} elements, expected uint8 with {(n + 1) // 2}")
        qmap = _take(sd, f"{w}.quant_map", where)
        _expect(torch.equal(qmap.float().reshape(-1), quant4.codebook(fmt)), where, f"{w}.quant_map",
                f"is not the standard {fmt} codebook")
        absmax = _take(sd, f"{w}.absmax", where)
        blocks = -(-n // bs)
        _expect(absmax.numel() == blocks, where, f"{w}.absmax", f"has {absmax.numel()} entries, expected {blocks}")
        used = [w, skey, f"{w}.quant_map", f"{w}.absmax"]
        dq = None
        if "nested_offset" in state or f"{w}.nested_absmax" in sd:
            a2 = _take(sd, f"{w}.nested_absmax", where)
            code2 = _take(sd, f"{w}.nested_quant_map", where)
            nbs = state.get("nested_blocksize", DOUBLE_QUANT_BLOCK)
            _expect(absmax.dtype == torch.uint8, where, f"{w}.absmax", f"is {absmax.dtype}; nested absmax is uint8")
            _expect(isinstance(nbs, int) and nbs > 0 and a2.numel() == -(-blocks // nbs), where,
                    f"{w}.nested_absmax", f"has {a2.numel()} entries for {blocks} blocks of nested blocksize {nbs}")
            _expect(code2.numel() == 256, where, f"{w}.nested_quant_map", f"has {code2.numel()} entries, expected 256")
            if check_finite:
                assert_finite(f"{w}.nested_absmax", a2, where)
            dq = DoubleQuant(absmax2=a2.float().reshape(-1), offset=torch.tensor(float(state["nested_offset"]),
                             dtype=torch.float32), code=code2.float().reshape(-1), block_size=nbs)
            used += [f"{w}.nested_absmax", f"{w}.nested_quant_map"]
        else:
            _expect(absmax.dtype == torch.float32, where, f"{w}.absmax", f"is {absmax.dtype}, expected float32")
            if check_finite:
                assert_finite(f"{w}.absmax", absmax, where)
        dtype = getattr(torch, str(state.get("dtype", "float32")), torch.float32)
        q = QTensor(data=data.reshape(-1), scales=absmax.reshape(-1), zeros=None, shape=torch.Size(shape),
                    dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32, fmt=fmt, block_size=bs,
                    double_quant=dq)
        return q, used
    # qru integer layouts
    scales = _take(sd, f"{w}.scales", where)
    used = [w, f"{w}.scales"]
    _expect(scales.dtype == torch.float32, where, f"{w}.scales", f"is {scales.dtype}, expected float32")
    if check_finite:
        assert_finite(f"{w}.scales", scales, where)
    if fmt == "int8":
        _expect(data.dtype == torch.int8 and tuple(data.shape) == (out_f, in_f), where, w,
                f"is {data.dtype} {tuple(data.shape)}, expected int8 {(out_f, in_f)}")
        _expect(tuple(scales.shape) == (out_f,), where, f"{w}.scales",
                f"has shape {tuple(scales.shape)}, expected {(out_f,)}")
        q = QTensor(data=data.reshape(-1).view(torch.uint8), scales=scales, zeros=None, shape=torch.Size(shape),
                    dtype=torch.float32, fmt=fmt, block_size=in_f)
        return q, used
    _expect(block_size in quant4.BLOCK_SIZES, where, w, f"needs quantization_config block_size, got {block_size!r}")
    groups = -(-in_f // block_size)
    _expect(data.dtype == torch.uint8 and tuple(data.shape) == (out_f, in_f // 2) and in_f % 2 == 0, where, w,
            f"is {data.dtype} {tuple(data.shape)}, expected uint8 {(out_f, in_f // 2)}")
    _expect(tuple(scales.shape) == (out_f, groups), where, f"{w}.scales",
            f"has shape {tuple(scales.shape)}, expected {(out_f, groups)}")
    zeros = None
    if fmt == "int4":
        zeros = _take(sd, f"{w}.zeros", where)
        used.append(f"{w}.zeros")
        _expect(zeros.dtype == torch.uint8 and tuple(zeros.shape) == (out_f, groups), where, f"{w}.zeros",
                f"is {zeros.dtype} {tuple(zeros.shape)}, expected uint8 {(out_f, groups)}")
    q = QTensor(data=data.reshape(-1), scales=scales, zeros=zeros, shape=torch.Size(shape), dtype=torch.float32,
                fmt=fmt, block_size=block_size)
    return q, used


def checkpoint_format(qc: Mapping | None, where: str = "") -> tuple[str, int | None]:
    """(format, qru block size or None) from a ``quantization_config``; raises on anything else."""
    if not isinstance(qc, Mapping):
        raise CheckpointError(f"{where}quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method == "bitsandbytes":
        if qc.get("load_in_8bit") or not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
            raise CheckpointError(f"{where}bitsandbytes 8-bit checkpoints (LLM.int8) are not supported; "
                                  f"only 4-bit nf4/fp4")
        fmt = qc.get("bnb_4bit_quant_type", "fp4")
        if fmt not in quant4.FORMATS_4BIT:
            raise CheckpointError(f"{where}quantization_config bnb_4bit_quant_type={fmt!r} is not nf4 or fp4")
        return fmt, None
    if method == "qru":
        fmt = qc.get("format")
        if fmt not in FORMATS or fmt in quant4.FORMATS_4BIT:
            raise CheckpointError(f"{where}quantization_config format={fmt!r} is not one of int4, int4_sym, int8")
        return fmt, qc.get("block_size")
    raise CheckpointError(f"{where}quantization_config quant_method={method!r} is not supported "
                          f"(bitsandbytes 4-bit or qru)")


def swap_in_quantized(model: torch.nn.Module, sd: dict[str, torch.Tensor], config, compute_dtype: torch.dtype,
                      device="cpu", check_finite: bool = True, where: str = "") -> list[str]:
    """Replace the linears of the (meta-device) ``model`` whose weights are stored quantized in
    ``sd`` by :class:`QuantLinear` modules, removing the consumed keys from ``sd``. Returns the
    swapped module names. A linear whose ``.weight`` is a float tensor stays ``nn.Linear``."""
    fmt, bs = checkpoint_format(config.quantization_config, where)
    targets, _ = split_linears(model, ())
    swapped = []
    for name, lin in targets:
        w = sd.get(f"{name}.weight")
        if w is None or w.is_floating_point():
            continue
        q, used = unpack_tensors(name, sd, fmt, (lin.out_features, lin.in_features), bs, where, check_finite)
        bias = sd.get(f"{name}.bias")
        if lin.bias is not None and bias is None:
            raise CheckpointError(f"{where}missing tensor {name + '.bias'!r}")
        if bias is not None:
            if lin.bias is None:
                raise CheckpointError(f"{where}unexpected tensor {name + '.bias'!r}")
            if check_finite:
                assert_finite(f"{name}.bias", bias, where)
            used.append(f"{name}.bias")
        mod = QuantLinear(q.to(device), None if bias is None else bias.to(device), compute_dtype)
        model.set_submodule(name, mod)
        for k in used:
            sd.pop(k, None)
        swapped.append(name)
    leftovers = [k for k in sd if ".weight." in k and k.rsplit(".weight.", 1)[0] not in swapped]
    if leftovers:
        raise CheckpointError(f"{where}unexpected tensor {leftovers[0]!r} (quantization state of a module that "
                              f"is not a quantized linear)")
    return swapped


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


def _check_adapter(adapter, shapes: dict[str, tuple[int, ...]], model_dir: Path):
    from qru.model.lora import (WEIGHTS_NAME, AdapterError, _check_pair, adapter_scales, map_adapter_keys,
                                read_adapter)

    cfg, asd = read_adapter(adapter)
    for key, t in asd.items():
        assert_finite(key, t, f"adapter {Path(adapter) / WEIGHTS_NAME}: ")
    scales = adapter_scales(asd, cfg)
    keymap = map_adapter_keys(asd.keys())
    for wkey, (akey, bkey) in keymap.items():
        if wkey not in shapes:
            raise AdapterError(f"adapter {adapter} does not fit {model_dir}: adapter key {akey!r} targets "
                               f"{wkey!r}, which the base checkpoint does not have")
        if len(shapes[wkey]) != 2:
            raise AdapterError(f"adapter {adapter}: base tensor {wkey!r} has shape {shapes[wkey]}, not a linear weight")
        try:
            _check_pair(akey, bkey, asd[akey], asd[bkey], shapes[wkey])
        except AdapterError as e:
            raise AdapterError(f"adapter {adapter} does not fit {model_dir} (base tensor {wkey!r} has shape "
                               f"{shapes[wkey]}): {e}") from None
    return {w: (asd[a], asd[b], scales[w]) for w, (a, b) in keymap.items()}


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
    from tqdm.auto import tqdm

    from qru.model.config import LlamaConfig
    from qru.model.llama import Llama
    from qru.model.lora import merge_weight

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
    merges = _check_adapter(adapter, shapes, model_dir) if adapter is not None else {}

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

"""The on-disk layout of quantized linears in a Hugging Face checkpoint (docs/formats.md,
"Checkpoint layout"): :class:`QTensor` <-> named tensors, and the loading half used by
``Llama.from_pretrained`` (:func:`swap_in_quantized`).

* nf4 / fp4: bitsandbytes' serialization (``<module>.weight`` uint8 ``(n/2, 1)``,
  ``.absmax``, ``.quant_map``, nested ``.nested_absmax`` / ``.nested_quant_map``, and
  ``.quant_state.bitsandbytes__<fmt>`` JSON bytes), ``quantization_config`` with
  ``quant_method: bitsandbytes``;
* int4 / int4_sym / int8: qru's (``<module>.weight`` packed, ``.scales``, ``.zeros``) with
  ``quant_method: qru``.

It sits below :mod:`qru.model` (which loads through it); :class:`CheckpointError` and
:func:`assert_finite` live here for that reason and are what ``qru.model.checkpoint`` raises.
"""
from __future__ import annotations

import json
from typing import Mapping

import torch

from qru.kernels import quant4
from qru.quant.formats import DOUBLE_QUANT_BLOCK, FORMATS, DoubleQuant, QTensor
from qru.quant.qlinear import QuantLinear, dtype_name, split_linears

_BNB_STATE_KEYS = ("quant_type", "blocksize", "dtype", "shape")
_BNB_NESTED_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked. The message names the file or tensor."""


def assert_finite(name: str, t: torch.Tensor, where: str = "") -> None:
    """Raise naming the tensor if it holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{where}tensor {name!r} has {bad} non-finite value(s) (NaN or Inf)")


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

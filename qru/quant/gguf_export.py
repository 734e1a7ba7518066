"""Merge-then-quantize export to one llama.cpp GGUF file (``qru quantize --format gguf:q4_0 ... --out m.gguf``).

Streams the checkpoint tensor by tensor (``ShardReader``), merges a PEFT LoRA adapter into each targeted
weight in fp32, applies llama.cpp's q/k row permutation, quantizes with ``gguf.quants.quantize`` (llama.cpp's
reference quantizers: the bytes are theirs; Q4_K / Q6_K, which ``gguf.quants`` cannot quantize, through
``libgguf``'s bindings of llama.cpp's reference code, an optional dependency) and writes the tensor at once;
peak memory is about one tensor and its fp32 copy. Tensor names, metadata and the tokenizer follow
llama.cpp's converter (``qru.model.gguf.add_metadata``). Norms stay F32; 2-D weights matched by ``skip`` are
stored F16. The file is written beside ``out`` and renamed into place when complete.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from qru.io import check_output, staged_file
from qru.model.checkpoint import checkpoint_shapes
from qru.quant.layout import assert_finite
from qru.model.config import LlamaConfig
from qru.model.gguf import add_metadata, expected_shapes, gguf_name, permute_qk
from qru.model.lora import adapter_updates, merge_weight
from qru.model.tokenizer import load_tokenizer
from qru.quant.qlinear import _as_tuple, is_skipped

GGUF_FORMATS = {"gguf:q8_0": QT.Q8_0, "gguf:q4_0": QT.Q4_0, "gguf:q4_1": QT.Q4_1, "gguf:q5_0": QT.Q5_0,
                "gguf:q5_1": QT.Q5_1, "gguf:mxfp4": QT.MXFP4, "gguf:q4_k": QT.Q4_K, "gguf:q6_k": QT.Q6_K}
K_QUANTS = (QT.Q4_K, QT.Q6_K)  # quantized by libgguf (pip install libgguf)


def _libgguf():
    """The optional ``libgguf`` module, or None."""
    try:
        import libgguf
    except ImportError:
        return None
    return libgguf


def _plan(cfg: LlamaConfig, shapes: dict[str, tuple[int, ...]], qtype, skip) -> dict[str, object]:
    """HF tensor name -> GGUF type: F32 for vectors, F16 for skipped matrices, ``qtype`` for the rest."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    plan = {}
    for k, s in shapes.items():
        module = k.removesuffix(".weight")
        head = module == "lm_head" or (cfg.tie_word_embeddings and module == "model.embed_tokens")
        if len(s) == 1:
            plan[k] = QT.F32
        elif is_skipped(module, skip) or (head and is_skipped("lm_head", skip)):
            plan[k] = QT.F16
        else:
            if s[1] % block:
                raise ValueError(f"tensor {k!r} has rows of {s[1]} values, not a multiple of the {qtype.name} "
                                 f"block ({block}); add it to --skip")
            plan[k] = qtype
    return plan


def _encode(t: np.ndarray, qtype) -> np.ndarray:
    """F32 / F16 as is, the block types through llama.cpp's reference quantizer (``gguf.quants``)."""
    if qtype in (QT.F32, QT.F16):
        return t.astype(np.float32 if qtype == QT.F32 else np.float16)
    if qtype in K_QUANTS:
        lib = _libgguf()
        return np.asarray(lib.quantize_rows(np.ascontiguousarray(t, dtype=np.float32), int(qtype)), dtype=np.uint8)
    return gguf.quants.quantize(t, qtype)


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, fmt: str, *,
                adapter: str | os.PathLike | None = None, skip=("lm_head",), progress: bool = False,
                overwrite: bool = False) -> Path:
    """Write ``model_dir`` (+ ``adapter`` merged in fp32) as a GGUF file ``out`` quantized to ``fmt``
    (``gguf:q8_0|q4_0|q4_1|q5_0|q5_1|mxfp4|q4_k|q6_k``), with the tokenizer beside the model. ``out``
    is checked before any work (not inside an input; an existing file needs ``overwrite``), streamed
    into a stage beside it under its lock and renamed into place (:func:`qru.io.staged_file`)."""
    from tqdm.auto import tqdm

    model_dir, out = Path(model_dir), Path(out)
    if fmt not in GGUF_FORMATS:
        raise ValueError(f"unknown GGUF format {fmt!r} (known: {', '.join(GGUF_FORMATS)})")
    qtype = GGUF_FORMATS[fmt]
    if qtype in K_QUANTS and _libgguf() is None:
        raise ValueError(f"{fmt} needs llama.cpp's reference K-quant code: pip install libgguf (or use q4_0/q4_1/"
                         f"q5_0/q5_1/q8_0/mxfp4)")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    check_output(out, {"model": model_dir, "adapter": adapter}, overwrite=overwrite, kind="file")
    config = LlamaConfig.from_json(model_dir)
    if config.quantization_config:
        raise ValueError(f"{model_dir} is already quantized ({config.quantization_config.get('quant_method')})")
    tok = load_tokenizer(model_dir)
    where = f"{model_dir}: "
    readers, shapes = checkpoint_shapes(model_dir, expected_shapes(config))
    plan = _plan(config, shapes, qtype, _as_tuple(skip))
    merges = adapter_updates(adapter, shapes, model_dir) if adapter is not None else {}

    with staged_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        add_metadata(w, config, tok, qtype, model_dir.name)
        order = [(r, k) for r in readers for k in r.keys()]
        for _, k in order:  # tensor infos first: shapes and byte sizes are known without reading
            qt = plan[k]
            rows, cols = (1, shapes[k][0]) if len(shapes[k]) == 1 else shapes[k]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            nbytes = rows * cols // block * size
            if qt in (QT.F32, QT.F16):
                w.add_tensor_info(gguf_name(k), shapes[k], np.dtype(np.float32 if qt == QT.F32 else np.float16), nbytes)
            else:
                w.add_tensor_info(gguf_name(k), (rows, cols // block * size), np.dtype(np.uint8), nbytes, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for r, k in tqdm(order, disable=not progress, unit="tensor", desc=f"quantize {fmt}"):
            t = r.get(k)
            if k in merges:
                A, B, s = merges[k]
                t = merge_weight(t.float(), A, B, s)
            t = t.float()
            assert_finite(k, t, where)
            if k.endswith("self_attn.q_proj.weight"):
                t = permute_qk(t, config.num_attention_heads)
            elif k.endswith("self_attn.k_proj.weight"):
                t = permute_qk(t, config.num_key_value_heads)
            w.write_tensor_data(_encode(t.numpy(), plan[k]))
            del t
        w.close()
    return out

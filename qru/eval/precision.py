"""Build one checkpoint at several precisions and evaluate each (merge-then-quantize).

``fp32``/``bf16``/``fp16`` cast the weights. ``int8``, ``nf4``, ``fp4``, ``int4``, ``int4_sym`` and
llama.cpp's GGUF block formats (``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k``, ``mxfp4``;
fixed blocks, so ``block_size`` does not apply to them) quantize in memory through
``qru.quant.quantize_model(model, fmt, block_size)``. With an adapter, the LoRA weights are merged into the fp32
base first (``qru.model.lora.load_adapter`` + ``merge_and_unload``) and the merged model is then cast or quantized.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from qru.model.config import LlamaConfig
from qru.model.lora import load_adapter, merge_and_unload
from qru.quant.export import checkpoint_format
from qru.quant.qlinear import quantize_model

FLOAT_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GGUF_PRECISIONS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "mxfp4")  # = qru.quant.GGUF_FORMATS
QUANT_PRECISIONS = ("int8", "nf4", "fp4", "int4", "int4_sym") + GGUF_PRECISIONS
PRECISIONS = tuple(FLOAT_PRECISIONS) + QUANT_PRECISIONS
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class PrecisionUnavailable(RuntimeError):
    """A requested precision cannot be built in this installation. The message says why."""


def parse_precisions(spec: str | Sequence[str]) -> list[str]:
    """``"bf16,int8"`` or a list -> validated, de-duplicated names (order kept)."""
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    items = [_ALIASES.get(p.lower(), p.lower()) for p in items if p]
    if not items:
        raise ValueError("no precision given (expected e.g. 'bf16,int8,nf4')")
    bad = [p for p in items if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision(s) {bad} (known: {', '.join(PRECISIONS)})")
    return list(dict.fromkeys(items))


def stored_precision(model_dir: str | Path) -> str | None:
    """The format of an already-quantized checkpoint (its ``quantization_config``), else None."""
    config = LlamaConfig.from_json(model_dir)
    if not config.quantization_config:
        return None
    return checkpoint_format(config.quantization_config, f"{Path(model_dir) / 'config.json'}: ")[0]


def check_stored_precision(model_dir: str | Path, precisions: Sequence[str]) -> str | None:
    """A quantized checkpoint is evaluated only at its own precision: anything else (which would
    silently evaluate the stored weights under another label) raises ValueError saying why."""
    own = stored_precision(model_dir)
    if own is not None and list(precisions) != [own]:
        raise ValueError(f"{model_dir} is already quantized ({own}, per the quantization_config of its "
                         f"config.json): it can only be evaluated at its own precision, not "
                         f"{', '.join(precisions)}; pass --precision {own}, or evaluate the unquantized "
                         f"checkpoint it was exported from at other precisions")
    return own


def check_available(precisions: Sequence[str], adapter: str | Path | None = None) -> None:
    """Fail fast (before loading anything) if the adapter directory is missing."""
    if adapter is not None:
        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"adapter directory not found: {adapter}")


def merge_adapter(model, adapter: str | Path):
    """Attach the PEFT LoRA adapter in ``adapter`` to the fp32 ``model`` and merge it into plain
    ``nn.Linear`` weights (``W + s·B A`` in fp32), in place."""
    return merge_and_unload(load_adapter(model, adapter))


def check_quantize_head(model_dir: str | Path, quantize_head: bool) -> None:
    """``quantize_head`` needs an untied ``lm_head``: a head tied to the embeddings (``tie_word_embeddings``)
    cannot be quantized separately; raise a ValueError naming the checkpoint (read from its config only)."""
    if not quantize_head:
        return
    from qru.model.config import LlamaConfig

    if LlamaConfig.from_json(model_dir).tie_word_embeddings:
        raise ValueError(f"quantize_head: {model_dir} ties lm_head to model.embed_tokens (tie_word_embeddings), "
                         "so the head cannot be quantized separately from the embeddings (which stay unquantized); "
                         "evaluate without --quantize-head")


def build_model(model_dir: str | Path, precision: str, adapter: str | Path | None = None, *,
                block_size: int = 64, device: str | torch.device = "cpu", quantize_head: bool = False):
    """Load ``model_dir`` in fp32, merge ``adapter`` if given, then cast or quantize to ``precision``
    (every linear but ``lm_head``; ``quantize_head``: an untied ``lm_head`` too)."""
    from qru.model.llama import Llama

    (precision,) = parse_precisions([precision])
    check_quantize_head(model_dir, quantize_head)
    if check_stored_precision(model_dir, [precision]) is not None:
        if adapter is not None:
            raise ValueError(f"{model_dir} is already quantized: an adapter cannot be merged into it (merge into "
                             "the unquantized checkpoint with qru quantize --adapter)")
        return Llama.from_pretrained(model_dir, device=device).eval()  # as stored, in its compute dtype
    model = Llama.from_pretrained(model_dir, dtype=torch.float32, device=device)
    if adapter is not None:
        model = merge_adapter(model, adapter)
    if precision in FLOAT_PRECISIONS:
        model = model.to(FLOAT_PRECISIONS[precision])
        model.config = model.config.replace(torch_dtype={"fp32": "float32", "bf16": "bfloat16",
                                                         "fp16": "float16"}[precision])
    else:
        q = quantize_model(model, precision, None if precision in GGUF_PRECISIONS else block_size,
                           skip=() if quantize_head else ("lm_head",))
        model = q if q is not None else model
    return model.eval()


def eval_at_precisions(model_dir: str | Path, adapter: str | Path | None, precisions: Sequence[str] | str,
                       fn: Callable[[object, str], dict], *, block_size: int = 64,
                       device: str | torch.device = "cpu", quantize_head: bool = False) -> list[dict]:
    """For each precision: build the model, call ``fn(model, precision) -> dict``, free it.

    Returns one record per precision with ``precision``, ``build_seconds`` and ``head_quantized``
    (whether ``lm_head`` was quantized: ``quantize_head`` at a quantized precision) added.
    """
    precisions = parse_precisions(precisions)
    own = check_stored_precision(model_dir, precisions)
    check_available([] if own else precisions, adapter)
    check_quantize_head(model_dir, quantize_head)
    records = []
    for p in precisions:
        t0 = time.perf_counter()
        model = build_model(model_dir, p, adapter, block_size=block_size, device=device, quantize_head=quantize_head)
        built = time.perf_counter() - t0
        rec = fn(model, p)
        records.append({"precision": p, **rec, "build_seconds": round(built, 4),
                        "head_quantized": bool(quantize_head and p in QUANT_PRECISIONS)})
        del model
        gc.collect()
    return records

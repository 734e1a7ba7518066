"""The survival analysis itself: :func:`analyze` streams every analysed weight through
:func:`qru.quant.survival.stats.chunk_sums` for every format."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from qru.kernels import quant4
from qru.model.config import LlamaConfig
from qru.model.lora import merge_weight
from qru.model.tokenizer import load_tokenizer
from qru.quant.formats import ALL_FORMATS, DEFAULT_BLOCK_SIZE, GGUF_FORMATS
from qru.quant.survival.inputs import (DEFAULT_SKIP, TensorIndex, _finite, calib_ids, calib_texts, linear_names,
                                       load_adapter_updates, stream_inputs)
from qru.quant.survival.stats import (CHUNK_ELEMS, Sums, SurvivalError, _sq, aggregate, chunk_sums, layer_index,
                                      metrics, module_type, row_chunk)
from qru.model.checkpoint import CheckpointError


def _parse_formats(formats) -> list[str]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(dict.fromkeys(formats))
    if not formats:
        raise SurvivalError(f"no format given (choose from {', '.join(ALL_FORMATS)})")
    for f in formats:
        if f not in ALL_FORMATS:
            raise SurvivalError(f"unknown format {f!r} (choose from {', '.join(ALL_FORMATS)})")
    return formats


def _block_sizes(formats: Sequence[str], block_size: int | None) -> dict[str, int | None]:
    if block_size is not None:
        try:
            quant4.check_block_size(block_size)
        except ValueError:
            raise SurvivalError(f"block_size must be a power of two between 32 and 4096, got {block_size!r}") from None
    # int8 is per row; GGUF formats have a fixed block (a given block_size does not apply to them)
    return {f: None if f == "int8" else DEFAULT_BLOCK_SIZE[f] if f in GGUF_FORMATS
            else (block_size or DEFAULT_BLOCK_SIZE[f]) for f in formats}


def analyze(base_dir: str | os.PathLike, unlearned_dir: str | os.PathLike | None = None, *,
            adapter: str | os.PathLike | None = None, formats: Sequence[str] | str = ("nf4",),
            block_size: int | None = None, calib: str | os.PathLike | None = None, calib_rows: int = 512,
            calib_seq_len: int = 256, skip: Sequence[str] = DEFAULT_SKIP, progress: bool = True,
            chunk_elems: int = CHUNK_ELEMS) -> dict:
    """Survival of ``ΔW`` under each format, per linear layer; returns the ``survival.json``
    content: ``{fmt: report}``, one report ``{"format", "block_size", "layers", "by_module_type",
    "by_layer_index", "overall"}`` per format (also for one format).

    ``unlearned_dir`` and/or ``adapter`` (PEFT LoRA dir) define ``W'``; ``block_size`` applies
    to every format but int8 (per row; reported as null) and the GGUF formats (fixed blocks);
    ``calib`` (text / JSON / MUSE dir, tokenized with the tokenizer in ``base_dir``) adds
    ``out_cosine`` / ``out_rel_err`` using the
    inputs of ``calib_rows`` tokens (sequences of ``calib_seq_len``); ``skip``: name patterns.
    Raises :class:`SurvivalError` / :class:`CheckpointError` / ``FileNotFoundError`` naming the culprit.
    """
    fmts = _parse_formats(formats)
    blocks = _block_sizes(fmts, block_size)
    if isinstance(skip, str):
        skip = [skip]
    if unlearned_dir is None and adapter is None:
        raise SurvivalError("give an unlearned checkpoint, an adapter, or both")
    if calib_rows < 1 or calib_seq_len < 1:
        raise SurvivalError(f"calib_rows and calib_seq_len must be >= 1, got {calib_rows}, {calib_seq_len}")
    base = TensorIndex(base_dir, "base checkpoint")
    unl = TensorIndex(unlearned_dir, "unlearned checkpoint") if unlearned_dir is not None else None
    upd = load_adapter_updates(adapter, base) if adapter is not None else {}
    if calib is not None and not Path(calib).exists():
        raise FileNotFoundError(f"calibration data not found: {calib}")
    names = linear_names(base, skip)
    if not names:
        raise SurvivalError(f"{base.path}: no linear weights to analyse (skip={list(skip)})")
    if unl is not None:
        for k in names:
            if k not in unl:
                raise CheckpointError(f"unlearned checkpoint {unl.path} has no tensor {k!r}")
            if unl.shape(k) != base.shape(k):
                raise CheckpointError(f"tensor {k!r} has shape {unl.shape(k)} in the unlearned checkpoint "
                                      f"but {base.shape(k)} in the base")
    if any(f.startswith("int4") for f in fmts):
        for k in names:
            if base.shape(k)[1] % 2:
                raise SurvivalError(f"tensor {k!r} has an odd number of columns ({base.shape(k)[1]}); "
                                    f"int4 formats need an even count")

    calib_iter = None
    if calib is not None:
        cfg = LlamaConfig.from_json(Path(base_dir) / "config.json")
        tok = load_tokenizer(base_dir)
        ids = calib_ids(calib_texts(calib), tok, calib_rows, min(calib_seq_len, cfg.max_position_embeddings))
        final = any(module_type(k[: -len(".weight")]) == "lm_head" for k in names)
        calib_iter = stream_inputs(base_dir, ids, calib_rows, final=final, index=base)
    captured: dict[str, torch.Tensor] = {}
    cur_layer: int | None = -1

    def inputs_for(module: str) -> torch.Tensor | None:
        nonlocal captured, cur_layer
        if calib_iter is None:
            return None
        li = layer_index(module)
        while cur_layer is not None and (li is None or cur_layer < li):
            try:
                cur_layer, captured = next(calib_iter)
            except StopIteration:
                cur_layer = None
        return captured.get(module if li is not None else module_type(module))

    results: dict[str, list[tuple[str, Sums]]] = {f: [] for f in fmts}
    t0 = time.perf_counter()
    for i, key in enumerate(names):
        module = key[: -len(".weight")]
        W = base.get(key)
        Wt = unl.get(key) if unl is not None else None
        lora = upd.get(key)
        x = inputs_for(module)
        sums = {f: Sums(has_out=x is not None, n_tensors=1) for f in fmts}
        rows = row_chunk(W.shape, fmts, blocks, chunk_elems)
        for r0 in range(0, W.shape[0], rows):
            w = W[r0:r0 + rows].float()
            wp = Wt[r0:r0 + rows].float() if Wt is not None else w
            if lora is not None:
                A, B, s = lora
                wp = merge_weight(wp, A, B[r0:r0 + rows], s)  # fp32 in, fp32 out
            d = wp - w
            w2, d2 = _sq(w), _sq(d)
            if not math.isfinite(w2):
                _finite(key, w, f"{base.path}: ", r0)
            if not math.isfinite(d2):
                if Wt is not None:
                    _finite(key, Wt[r0:r0 + rows], f"{unl.path}: ", r0)
                _finite(key, wp, f"{adapter} merged into the weights: ", r0)
            yd = x @ d.T if x is not None and d2 > 0 else None
            for f in fmts:
                try:
                    sums[f] += chunk_sums(w, wp, f, blocks[f], x, yd, d=d, w2=w2, d2=d2)
                except ValueError as e:
                    raise SurvivalError(f"tensor {key!r}: {e}") from None
        for f in fmts:
            results[f].append((module, sums[f]))
        del W, Wt
        if progress:
            print(f"[survival {i + 1}/{len(names)}] {module} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr,
                  flush=True)
    if calib_iter is not None:
        calib_iter.close()

    out = calib is not None
    reports = {}
    for f in fmts:
        by_type, by_layer, overall = aggregate(results[f], out)
        reports[f] = {"format": f, "block_size": blocks[f],
                      "layers": [{"name": n, **metrics(s, out)} for n, s in results[f]],
                      "by_module_type": by_type, "by_layer_index": by_layer, "overall": overall}
    return reports

"""``qru eval`` behind the CLI: evaluate one checkpoint at several precisions, print a table,
write a JSON file with one self-contained record per precision."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from qru import __version__
from qru.data import read_records
from qru.eval import muse, tofu
from qru.eval.common import nan_to_none
from qru.eval.precision import (build_model, check_available, check_quantize_head, check_stored_precision,
                                 eval_at_precisions, parse_precisions)
from qru.io import check_device, check_output, target_lock, write_json
from qru.model.config import LlamaConfig
from qru.model.tokenizer import TOKENIZER_FILES, load_tokenizer

BENCHMARKS = ("muse", "tofu")
_COLUMNS = {
    "muse": [("verbmem_f", "VerbMem_f"), ("knowmem_f", "KnowMem_f"), ("knowmem_r", "KnowMem_r"),
             ("auc", "AUC"), ("privleak", "PrivLeak")],
    "tofu": [("forget_prob", "F.Prob"), ("forget_rouge", "F.ROUGE"), ("forget_truth_ratio", "F.TR"),
             ("forget_quality", "ForgetQ"), ("retain_prob", "R.Prob"), ("retain_rouge", "R.ROUGE"),
             ("retain_truth_ratio", "R.TR"), ("model_utility", "Utility")],
}


def _load_tokenizer(model_dir: Path, fallback=None):
    """The tokenizer beside a checkpoint (``tokenizer.json`` or ``tokenizer.model``), else ``fallback``."""
    if fallback is not None and not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        return fallback
    return load_tokenizer(model_dir)


def _check_vocab(model_dir: Path, tok) -> None:
    vocab = LlamaConfig.from_json(model_dir).vocab_size
    if tok.vocab_size > vocab:
        raise ValueError(f"vocabulary mismatch: the tokenizer {tok.path} has {tok.vocab_size} pieces but the model "
                         f"{model_dir} has vocab_size={vocab}; use the tokenizer the model was trained with")


def _atomic_write_json(path: Path, obj) -> None:
    write_json(path, obj, indent=1, ensure_ascii=False, allow_nan=False)


def format_table(records: Sequence[dict], benchmark: str) -> str:
    """A plain-text table: one row per precision, the benchmark's headline metrics and tokens/s."""
    cols = [("precision", "precision")] + _COLUMNS[benchmark] + [("tokens_per_s", "tok/s")]
    rows = []
    for r in records:
        row = []
        for key, _ in cols:
            v = r.get(key)
            if key == "tokens_per_s":
                v = (r.get("throughput") or {}).get("tokens_per_s")
            if v is None:
                row.append("-")
            elif isinstance(v, float):
                small = v != 0 and abs(v) < 0.01
                row.append(f"{v:.3g}" if key == "forget_quality" or small else f"{v:.4f}" if abs(v) < 1.5
                           else f"{v:.2f}")
            else:
                row.append(str(v))
        rows.append(row)
    head = [h for _, h in cols]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def run_eval(model_dir: str | Path, benchmark: str, data_dir: str | Path, *, out: str | Path | None = None,
             adapter: str | Path | None = None, retrain_model: str | Path | None = None,
             retrain_auc: float | None = None, precisions: str | Sequence[str] = "fp32",
             limit: int | None = None, seed: int = 0, batch_size: int = 16, score_batch_size: int = 8,
             max_len: int | None = None, block_size: int = 64, forget_split: str = "forget10",
             retain_split: str = "retain_perturbed", device: str = "cpu", progress: bool = False,
             log=print, overwrite: bool = False, quantize_head: bool = False) -> dict:
    """Evaluate ``model_dir`` (plus ``adapter``) on ``benchmark`` at each precision.

    MUSE: ``retrain_auc`` or ``retrain_model`` (its forget/holdout AUC at fp32) gives PrivLeak.
    TOFU: ``retrain_model`` is the retain model whose forget-set truth ratios give forget quality.
    Everything is validated before the first model is built, ``out`` included (not an input or a
    file inside the data; an existing file needs ``overwrite``). Returns the JSON payload (also
    written atomically to ``out`` when given).
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r} (choose from {', '.join(BENCHMARKS)})")
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model checkpoint not found: {model_dir / 'config.json'} does not exist")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    if retrain_model is not None and retrain_auc is not None:
        raise ValueError("give either retrain_model or retrain_auc, not both")
    if retrain_auc is not None:
        if benchmark != "muse":
            raise ValueError("retrain_auc applies to MUSE PrivLeak only")
        muse.check_retrain_auc(retrain_auc)
    if retrain_model is not None and not (Path(retrain_model) / "config.json").is_file():
        raise FileNotFoundError(f"retrain model checkpoint not found: {Path(retrain_model) / 'config.json'}")
    if out is not None:
        check_output(out, {"model": model_dir, "adapter": adapter, "data": data_dir, "retrain model": retrain_model},
                     overwrite=overwrite, kind="file", may_sit_inside=("model", "adapter", "retrain model"))
    check_device(str(device))
    precisions = parse_precisions(precisions)
    own = check_stored_precision(model_dir, precisions)
    if own is not None and adapter is not None:
        raise ValueError(f"{model_dir} is already quantized ({own}): an adapter cannot be merged into it")
    check_available([] if own else precisions, adapter)
    check_quantize_head(model_dir, quantize_head)
    tok = _load_tokenizer(model_dir)
    _check_vocab(model_dir, tok)
    if retrain_model is not None:
        _check_vocab(Path(retrain_model), _load_tokenizer(Path(retrain_model), fallback=tok))
    # Fail on bad data before any model work.
    if benchmark == "muse":
        for key, p in muse.resolve_files(data_dir).items():
            read_records(p, allow_str=key.startswith("privleak"))
    else:
        tofu.load_split(data_dir, forget_split)
        tofu.load_split(data_dir, retain_split)

    ref_info: dict = {}
    if retrain_model is not None:
        t0 = time.perf_counter()
        ref = build_model(retrain_model, "fp32", device=device)
        ref_tok = _load_tokenizer(Path(retrain_model), fallback=tok)
        torch.manual_seed(seed)
        if benchmark == "muse":
            retrain_auc = muse.muse_auc(ref, ref_tok, data_dir, limit=limit, batch_size=score_batch_size,
                                        max_len=max_len)
            ref_info = {"retrain_auc": retrain_auc}
            log(f"retrain model {retrain_model}: forget/holdout AUC = {retrain_auc:.4f}")
            muse.check_retrain_auc(retrain_auc)
        else:
            ref_info = {"retain_truth_ratios": tofu.forget_truth_ratios(
                ref, ref_tok, data_dir, forget_split=forget_split, limit=limit, score_batch_size=score_batch_size)}
            log(f"retain model {retrain_model}: {len(ref_info['retain_truth_ratios'])} forget-set truth ratios")
        ref_info["retrain_seconds"] = round(time.perf_counter() - t0, 4)
        del ref

    def fn(model, precision):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        if benchmark == "muse":
            rec = muse.evaluate_muse(model, tok, data_dir, retrain_auc=retrain_auc, limit=limit,
                                     batch_size=batch_size, score_batch_size=score_batch_size,
                                     max_len=max_len, progress=progress)
        else:
            rec = tofu.evaluate_tofu(model, tok, data_dir, forget_split=forget_split, retain_split=retain_split,
                                     retain_truth_ratios=ref_info.get("retain_truth_ratios"), limit=limit,
                                     batch_size=batch_size, score_batch_size=score_batch_size, progress=progress)
        rec["eval_seconds"] = round(time.perf_counter() - t0, 4)
        th = rec["throughput"]
        log(f"[{precision}] done in {rec['eval_seconds']:.1f}s, {th['tokens']} tokens, "
            f"{th['tokens_per_s']:.1f} tokens/s")
        return rec

    meta = {"benchmark": benchmark, "model": str(model_dir), "adapter": None if adapter is None else str(adapter),
            "data": str(data_dir), "qru_version": __version__, "seed": seed, "limit": limit,
            "retrain_model": None if retrain_model is None else str(retrain_model), "device": str(device)}
    records = eval_at_precisions(model_dir, adapter, precisions, fn, block_size=block_size, device=device,
                                 quantize_head=quantize_head)
    records = [{**r, **meta, **({"block_size": block_size} if r["precision"] not in ("fp32", "bf16", "fp16")
                               else {})} for r in records]
    payload = nan_to_none({**meta, "precisions": precisions, "retrain": {k: v for k, v in ref_info.items()},
                           "records": records})
    log(format_table(records, benchmark))
    if out is not None:
        with target_lock(out):
            _atomic_write_json(Path(out), payload)
        log(f"wrote {out}")
    return payload

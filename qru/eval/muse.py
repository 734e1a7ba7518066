"""MUSE benchmark metrics (Shi et al., 2024), following the reference ``muse_bench`` code.

- VerbMem: greedy continuation (128 new tokens) of each ``verbmem/forget.json`` ``prompt``;
  ROUGE-L F1 against ``gt`` cut to its first 128 tokens (BOS included, as the reference
  encodes with special tokens), mean x100.
- KnowMem: few-shot prompt of ``Question: {q}\\nAnswer: {a}\\n\\n`` pairs from ``*_qa_icl.json``
  then ``Question: {q}\\nAnswer: ``; greedy 32 new tokens cut at "\\n\\n", "\\nQuestion",
  "Question:"; ROUGE-L F1 (``fmeasure``, rouge-score, no stemmer) against the answer, mean x100:
  the reference's ``knowmem_agg_key='mean_rougeL'`` (``RougeEvalLogger``). The mean ROUGE-L recall
  is reported beside it (``knowmem_f_recall`` / ``knowmem_r_recall``).
- PrivLeak: Min-40% scores on ``privleak/forget.json`` vs ``privleak/holdout.json``; AUC
  with MUSE's orientation (see ``common.auc_forget_holdout``);
  PrivLeak = (AUC - AUC_retrain) / AUC_retrain x 100. Near 0 is good; strongly negative means
  the forget set still looks memorised (under-unlearning), positive means over-unlearning.
- Utility: KnowMem on ``knowmem/retain_qa.json`` (``knowmem_r``).
- Min-40% gap (not in MUSE; a PrivLeak companion that cannot saturate): mean Min-40% score of
  the holdout texts minus that of the forget texts (the scores are -mean of the lowest 40% token
  log-probs, so the gap is how much more likely the forget texts are), with a bootstrap 95%
  interval; :func:`scaled_gap` maps it so that the target model = 1 and the retrain model = 0.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from qru.eval.common import (EvalDataError, Meter, auc_forget_holdout, load_records, membership_scores,
                             rouge_l, score_sequences, take)

VERBMEM_MAX_NEW = 128
KNOWMEM_MAX_NEW = 32
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")
METRICS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")

# File names relative to the MUSE data directory (the HF ``muse-bench/MUSE-News`` layout).
DEFAULT_FILES = {
    "verbmem_forget": "verbmem/forget.json",
    "knowmem_forget_qa": "knowmem/forget_qa.json",
    "knowmem_forget_qa_icl": "knowmem/forget_qa_icl.json",
    "knowmem_retain_qa": "knowmem/retain_qa.json",
    "knowmem_retain_qa_icl": "knowmem/retain_qa_icl.json",
    "privleak_forget": "privleak/forget.json",
    "privleak_holdout": "privleak/holdout.json",
}
_NEEDS = {
    "verbmem_f": ("verbmem_forget",),
    "knowmem_f": ("knowmem_forget_qa", "knowmem_forget_qa_icl"),
    "knowmem_r": ("knowmem_retain_qa", "knowmem_retain_qa_icl"),
    "privleak": ("privleak_forget", "privleak_holdout"),
}


# -- prompts ------------------------------------------------------------------------------

def knowmem_prompt(question: str, icl: Sequence[tuple[str, str]]) -> str:
    """The few-shot KnowMem prompt: every ICL pair, then the question with an open answer."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in icl)
    return shots + f"Question: {question}\nAnswer: "


def cut_answer(text: str, stops: Sequence[str] = KNOWMEM_STOP) -> str:
    """The reference's post-processing: the prefix before the first occurrence of any stop."""
    for s in stops:
        text = text.split(s)[0]
    return text


def truncate_tokens(tokenizer, text: str, n: int) -> str:
    """``text`` cut to its first ``n`` tokens, counting BOS like the reference (HF
    ``tokenizer(gt, add_special_tokens=True).input_ids[:, :n]`` then decode)."""
    return tokenizer.decode(tokenizer.encode(text, bos=True)[:n])


def privleak_from_auc(auc: float, retrain_auc: float) -> float:
    """PrivLeak = (AUC - AUC_retrain) / AUC_retrain x 100."""
    check_retrain_auc(retrain_auc)
    return (auc - retrain_auc) / retrain_auc * 100.0


def check_retrain_auc(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < float(x) < 1.0:
        raise ValueError(f"retrain AUC must be a number in (0, 1) (exclusive), got {x!r}")
    return float(x)


# -- data ---------------------------------------------------------------------------------

def resolve_files(data_dir: str | Path, metrics: Sequence[str] = METRICS, files: dict | None = None) -> dict[str, Path]:
    """Absolute paths of the files the chosen metrics need; FileNotFoundError names a missing one."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"MUSE data directory not found: {data_dir}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown MUSE metric(s) {unknown} (known: {list(METRICS)})" if unknown
                         else "metrics must name at least one MUSE metric")
    table = {**DEFAULT_FILES, **(files or {})}
    bad = set(files or {}) - set(DEFAULT_FILES)
    if bad:
        raise ValueError(f"unknown MUSE file key(s) {sorted(bad)} (known: {sorted(DEFAULT_FILES)})")
    out = {}
    for m in metrics:
        for key in _NEEDS[m]:
            p = Path(table[key])
            p = p if p.is_absolute() else data_dir / p
            if not p.is_file():
                raise FileNotFoundError(f"MUSE data file missing for {m}: {p} ({key})")
            out[key] = p
    return out


def _texts(path: Path, limit: int | None) -> list[str]:
    items = take(load_records(path, allow_str=True, what="texts"), limit)
    out = []
    for i, it in enumerate(items):
        t = it if isinstance(it, str) else it.get("text")
        if not isinstance(t, str):
            raise EvalDataError(f"{path}: item {i} is an object without a string 'text' field")
        if not t.strip():
            raise EvalDataError(f"{path}: item {i} is an empty text")
        out.append(t)
    return out


# -- metrics ------------------------------------------------------------------------------

def _generate(model, tokenizer, prompts, max_new_tokens, stop, batch_size, meter: Meter, stage: str,
              progress: bool = False, share_prefix: bool = False) -> list[str]:
    from qru.eval.generation import generate_batched
    from qru.model.generate import generate

    limit = model.config.max_position_embeddings - max_new_tokens
    t0 = time.perf_counter()
    if share_prefix:
        outs = generate_batched(model, tokenizer, prompts, max_new_tokens, stop=stop, batch_size=batch_size)
    else:
        outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop,
                        batch_size=batch_size, progress=progress)
    dt = time.perf_counter() - t0
    n = sum(min(len(tokenizer.encode(p, bos=True)), limit) for p in prompts)
    n += sum(len(tokenizer.encode(o, bos=False)) for o in outs)
    meter.add(stage, n, dt)
    return outs


def eval_verbmem(model, tokenizer, items: list[dict], *, max_new_tokens: int = VERBMEM_MAX_NEW,
                 batch_size: int = 16, meter: Meter | None = None, progress: bool = False) -> tuple[float, list]:
    """Mean ROUGE-L F1 x100 of greedy continuations against ``gt`` (first 128 tokens)."""
    meter = meter or Meter()
    outs = _generate(model, tokenizer, [d["prompt"] for d in items], max_new_tokens, (), batch_size,
                     meter, "verbmem_f", progress)
    log = []
    for i, (d, out) in enumerate(zip(items, outs)):
        gt = truncate_tokens(tokenizer, d["gt"], max_new_tokens)
        f, r = rouge_l(gt, out)
        log.append({"i": i, "gt": gt, "output": out, "rougeL_f": f, "rougeL_r": r})
    return 100.0 * sum(x["rougeL_f"] for x in log) / len(log), log


def eval_knowmem(model, tokenizer, qa: list[dict], icl: list[dict], *, max_new_tokens: int = KNOWMEM_MAX_NEW,
                 batch_size: int = 16, meter: Meter | None = None, stage: str = "knowmem",
                 progress: bool = False, share_prefix: bool = True) -> tuple[float, float, list]:
    """``(mean ROUGE-L F1 x100, mean ROUGE-L recall x100, per-item log)`` of few-shot answers
    (F1 is MUSE's KnowMem; recall is kept as an extra).

    With ``share_prefix`` the ICL prefix common to a batch is prefilled once per batch
    (``qru.eval.generation``); a progress bar is only shown without it.
    """
    meter = meter or Meter()
    shots = [(d["question"], d["answer"]) for d in icl]
    prompts = [knowmem_prompt(d["question"], shots) for d in qa]
    outs = _generate(model, tokenizer, prompts, max_new_tokens, KNOWMEM_STOP, batch_size, meter, stage, progress,
                     share_prefix=share_prefix)
    log = []
    for i, (d, out) in enumerate(zip(qa, outs)):
        ans = cut_answer(out)
        f, r = rouge_l(d["answer"], ans)
        log.append({"i": i, "question": d["question"], "answer": d["answer"], "output": ans,
                    "rougeL_f": f, "rougeL_r": r})
    n = len(log)
    return 100.0 * sum(x["rougeL_f"] for x in log) / n, 100.0 * sum(x["rougeL_r"] for x in log) / n, log


def privleak_scores(model, tokenizer, texts: Sequence[str], *, k: float = 0.4, batch_size: int = 8,
                    max_len: int | None = None, meter: Meter | None = None, stage: str = "privleak") -> list[dict]:
    """Per-text membership scores (``PPL``, ``PPL/zlib``, ``Min-k%``, ``Min-k%++``, ``n_tokens``)."""
    meter = meter or Meter()
    t0 = time.perf_counter()
    scores = score_sequences(model, tokenizer, texts, batch_size=batch_size, max_len=max_len)
    meter.add(stage, sum(s.n_tokens + 1 for s in scores), time.perf_counter() - t0)
    return [membership_scores(s, t, k) for s, t in zip(scores, texts)]


def privleak_aucs(forget: list[dict], holdout: list[dict]) -> dict[str, float]:
    """``forget_holdout`` AUC for every score kind present."""
    keys = [k for k in forget[0] if k != "n_tokens"]
    return {k: auc_forget_holdout([d[k] for d in forget], [d[k] for d in holdout]) for k in keys}


def min_k_gap(forget: Sequence[float], holdout: Sequence[float]) -> float:
    """Mean Min-k% score of the holdout texts minus that of the forget texts: > 0 when the forget
    texts are more likely (scores are -mean of the lowest k% log-probs, lower = member-like)."""
    f, h = np.asarray(forget, dtype=np.float64), np.asarray(holdout, dtype=np.float64)
    if f.size == 0 or h.size == 0:
        raise ValueError(f"Min-k% gap needs both sets non-empty (forget={f.size}, holdout={h.size})")
    return float(h.mean() - f.mean())


def _resamples(n_f: int, n_h: int, n_boot: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_f, (n_boot, n_f)), rng.integers(0, n_h, (n_boot, n_h))


def gap_interval(forget: Sequence[float], holdout: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """:func:`min_k_gap` with a percentile bootstrap interval (forget and holdout texts resampled
    independently): ``{"gap", "ci": [lo, hi], "level", "n_boot"}``."""
    f, h = np.asarray(forget, dtype=np.float64), np.asarray(holdout, dtype=np.float64)
    g = min_k_gap(f, h)
    fi, hi = _resamples(f.size, h.size, n_boot, seed)
    boot = h[hi].mean(1) - f[fi].mean(1)
    a = (1 - level) / 2
    return {"gap": g, "ci": [float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))], "level": level,
            "n_boot": n_boot}


def scaled_gap(model: dict, target: dict, retrain: dict, *, n_boot: int = 2000, seed: int = 0,
               level: float = 0.95) -> dict:
    """The Min-k% gap of ``model`` scaled so that the target = 1 and the retrain model = 0:
    ``(gap(model) - gap(retrain)) / (gap(target) - gap(retrain))``.

    Each argument is ``{"forget": [...], "holdout": [...]}``: per-text Min-k% scores of the SAME texts
    (same order) under that model. The interval is a paired percentile bootstrap: each resample draws
    forget and holdout texts with replacement and applies the same draw to all three models.
    Unlike the AUC behind PrivLeak, the gap does not saturate when the two sets separate perfectly.
    Returns ``{"value", "ci", "gap", "target_gap", "retrain_gap", "level", "n_boot"}``; ``value`` and
    ``ci`` are None when the target and retrain gaps are equal (nothing to scale by).
    """
    arrs = {}
    for name, d in (("model", model), ("target", target), ("retrain", retrain)):
        for side in ("forget", "holdout"):
            if side not in d:
                raise ValueError(f"scaled_gap: {name} has no {side!r} scores")
            arrs[name, side] = np.asarray(d[side], dtype=np.float64)
    for side in ("forget", "holdout"):
        n = {arrs[k, side].size for k in ("model", "target", "retrain")}
        if len(n) != 1:
            raise ValueError(f"scaled_gap: the models' {side} score lists differ in length {sorted(n)} "
                             "(they must score the same texts)")
    gaps = {k: min_k_gap(arrs[k, "forget"], arrs[k, "holdout"]) for k in ("model", "target", "retrain")}
    den = gaps["target"] - gaps["retrain"]
    out = {"value": None, "ci": None, "gap": gaps["model"], "target_gap": gaps["target"],
           "retrain_gap": gaps["retrain"], "level": level, "n_boot": n_boot}
    if den == 0:
        return out
    out["value"] = (gaps["model"] - gaps["retrain"]) / den
    fi, hi = _resamples(arrs["model", "forget"].size, arrs["model", "holdout"].size, n_boot, seed)
    bg = {k: arrs[k, "holdout"][hi].mean(1) - arrs[k, "forget"][fi].mean(1) for k in ("model", "target", "retrain")}
    bden = bg["target"] - bg["retrain"]
    ok = bden != 0
    boot = (bg["model"][ok] - bg["retrain"][ok]) / bden[ok]
    a = (1 - level) / 2
    out["ci"] = [float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))]
    return out


def muse_auc(model, tokenizer, data_dir, *, k: float = 0.4, limit: int | None = None, batch_size: int = 8,
             max_len: int | None = None, files: dict | None = None) -> float:
    """The forget-vs-holdout Min-k% AUC of one model (e.g. the retrained reference)."""
    paths = resolve_files(data_dir, ("privleak",), files)
    f = privleak_scores(model, tokenizer, _texts(paths["privleak_forget"], limit), k=k,
                        batch_size=batch_size, max_len=max_len)
    h = privleak_scores(model, tokenizer, _texts(paths["privleak_holdout"], limit), k=k,
                        batch_size=batch_size, max_len=max_len)
    return privleak_aucs(f, h)[f"Min-{int(round(k * 100))}%"]


def evaluate_muse(model, tokenizer, data_dir: str | Path, *, retrain_auc: float | None = None,
                  limit: int | None = None, batch_size: int = 16, score_batch_size: int = 8,
                  max_len: int | None = None, k: float = 0.4, metrics: Sequence[str] = METRICS,
                  files: dict | None = None, verbmem_max_new_tokens: int = VERBMEM_MAX_NEW,
                  knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW, share_prefix: bool = True,
                  progress: bool = False, gap_refs: dict | None = None) -> dict:
    """Run the MUSE metrics on one (already built) model.

    ``files`` overrides entries of ``DEFAULT_FILES`` (relative to ``data_dir`` or absolute).
    ``limit`` keeps the first N items of each evaluated file (ICL shots are always all used).
    ``max_len`` caps the scored length of PrivLeak texts (default: the model's context).
    ``share_prefix`` prefills the KnowMem ICL prefix once per generation batch.
    Returns a dict with ``verbmem_f``, ``knowmem_f``, ``knowmem_r`` (ROUGE-L F1 x100, as MUSE),
    ``knowmem_f_recall``/``knowmem_r_recall`` (ROUGE-L recall x100), ``auc`` (Min-k%), ``aucs`` (all score kinds),
    ``privleak`` (None without ``retrain_auc``), ``min_k_gap`` (:func:`gap_interval` of the Min-k% scores),
    ``min_k_gap_scaled`` (:func:`scaled_gap`, target = 1, retrain = 0; only with ``gap_refs``:
    ``{"target": {"forget": [...], "holdout": [...]}, "retrain": {...}}``, those models' per-text Min-k%
    scores of the same texts, e.g. from their own ``items["privleak"]``),
    per-item ``items`` and ``throughput``.
    """
    if retrain_auc is not None:
        check_retrain_auc(retrain_auc)
    if gap_refs is not None and not (isinstance(gap_refs, dict) and {"target", "retrain"} <= set(gap_refs)):
        raise ValueError("gap_refs must be a dict with 'target' and 'retrain' Min-k% scores "
                         "({'forget': [...], 'holdout': [...]} each)")
    take([], limit)  # validates limit
    paths = resolve_files(data_dir, metrics, files)
    # Load and validate everything before the first (slow) model call.
    data: dict[str, list] = {}
    if "verbmem_f" in metrics:
        data["verbmem_f"] = take(load_records(paths["verbmem_forget"], ("prompt", "gt")), limit)
    for m, side in (("knowmem_f", "forget"), ("knowmem_r", "retain")):
        if m in metrics:
            data[m] = take(load_records(paths[f"knowmem_{side}_qa"], ("question", "answer")), limit)
            data[m + "_icl"] = load_records(paths[f"knowmem_{side}_qa_icl"], ("question", "answer"))
    if "privleak" in metrics:
        data["privleak_forget"] = _texts(paths["privleak_forget"], limit)
        data["privleak_holdout"] = _texts(paths["privleak_holdout"], limit)
        for name, ref in (gap_refs or {}).items():
            for side in ("forget", "holdout"):
                n = len(ref.get(side, ())) if isinstance(ref, dict) else -1
                if n != len(data[f"privleak_{side}"]):
                    raise ValueError(f"gap_refs[{name!r}][{side!r}] has {n} scores for "
                                     f"{len(data[f'privleak_{side}'])} {side} texts")

    meter = Meter()
    out: dict = {"verbmem_f": None, "knowmem_f": None, "knowmem_r": None, "knowmem_f_recall": None,
                 "knowmem_r_recall": None, "auc": None, "aucs": None, "min_k_gap": None, "min_k_gap_scaled": None,
                 "privleak": None, "retrain_auc": retrain_auc, "k": k, "items": {}, "n_items": {}}
    was_training = model.training
    model.eval()
    try:
        if "verbmem_f" in metrics:
            out["verbmem_f"], out["items"]["verbmem_f"] = eval_verbmem(
                model, tokenizer, data["verbmem_f"], max_new_tokens=verbmem_max_new_tokens,
                batch_size=batch_size, meter=meter, progress=progress)
        for m in ("knowmem_f", "knowmem_r"):
            if m in metrics:
                out[m], out[m + "_recall"], out["items"][m] = eval_knowmem(
                    model, tokenizer, data[m], data[m + "_icl"], max_new_tokens=knowmem_max_new_tokens,
                    batch_size=batch_size, meter=meter, stage=m, progress=progress, share_prefix=share_prefix)
        if "privleak" in metrics:
            f = privleak_scores(model, tokenizer, data["privleak_forget"], k=k, batch_size=score_batch_size,
                                max_len=max_len, meter=meter)
            h = privleak_scores(model, tokenizer, data["privleak_holdout"], k=k, batch_size=score_batch_size,
                                max_len=max_len, meter=meter)
            out["aucs"] = privleak_aucs(f, h)
            key = f"Min-{int(round(k * 100))}%"
            out["auc"] = out["aucs"][key]
            mine = {"forget": [d[key] for d in f], "holdout": [d[key] for d in h]}
            out["min_k_gap"] = gap_interval(mine["forget"], mine["holdout"])
            if gap_refs is not None:
                out["min_k_gap_scaled"] = scaled_gap(mine, gap_refs["target"], gap_refs["retrain"])
            if retrain_auc is not None:
                out["privleak"] = privleak_from_auc(out["auc"], retrain_auc)
            out["items"]["privleak"] = {"forget": [{"i": i, **d} for i, d in enumerate(f)],
                                        "holdout": [{"i": i, **d} for i, d in enumerate(h)]}
    finally:
        model.train(was_training)
    out["n_items"] = {k_: (len(v) if isinstance(v, list) else len(v["forget"]) + len(v["holdout"]))
                      for k_, v in out["items"].items()}
    out["throughput"] = meter.summary()
    return out

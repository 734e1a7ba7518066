"""TOFU metrics (Maini et al., 2024), following the reference ``locuslab/tofu`` code.

Per QA set (``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answer`` list):

- Prob: mean over items of ``exp(-mean NLL of the answer tokens | prompt)``. For sets
  without a paraphrase (real authors / world facts) the reference normalises over the
  options: ``p(answer) / (p(answer) + sum p(perturbed))``.
- ROUGE: ROUGE-L recall (stemmer on) of the greedy answer against ``answer``.
- Truth ratio: per item ``r = exp(mean_j L(perturbed_j) - L(paraphrased))`` with L the
  per-token NLL, i.e. the paraphrase's length-normalised probability over the perturbed
  ones'. Reported as ``mean(min(r, 1/r))`` on the forget set and ``mean(max(0, 1 - 1/r))``
  elsewhere, as in the reference.
- Forget quality: the KS-test p-value (scipy ``ks_2samp``) between the model's ``r`` on
  the forget set and a retain model's ``r`` on the same items.
- Model utility: harmonic mean of Prob, ROUGE and truth ratio over the non-forget sets
  available in the data directory.

The prompt is ``template.format(question=q)`` (default ``"Question: {q}\\nAnswer: "``, the
reference's non-chat template); the answer follows it directly. Generation starts from the
prompt with its trailing spaces removed, so the first answer token carries its own space.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from qru.eval.common import EvalDataError, Meter, load_records, rouge_l, score_sequences, take

TEMPLATE = "Question: {question}\nAnswer: "
MAX_NEW_TOKENS = 128
EXTRA_SPLITS = ("real_authors_perturbed", "world_facts_perturbed")
_QA = ("question", "answer")


# -- data -----------------------------------------------------------------------------------

def load_split(data_dir: str | Path, name: str, perturbed: bool = True) -> list[dict]:
    """Items of split ``name`` (file stem in ``data_dir``).

    With ``perturbed``, items need ``perturbed_answer``: taken from ``{name}_perturbed.json``
    when it exists, else matched by question from the other ``*_perturbed.json`` files (the
    released ``forget01`` is a subset of ``forget10_perturbed``).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"TOFU data directory not found: {data_dir}")
    keys = _QA + (("perturbed_answer",) if perturbed else ())
    direct = data_dir / f"{name}.json"
    pert = data_dir / f"{name}_perturbed.json"
    if perturbed and not name.endswith("_perturbed") and pert.is_file():
        return load_records(pert, keys, what="QA items")
    if not direct.is_file():
        raise FileNotFoundError(f"TOFU split file not found: {direct}")
    items = load_records(direct, keys if not perturbed or name.endswith("_perturbed") else _QA,
                         what="QA items")
    if not perturbed or all("perturbed_answer" in d for d in items):
        return items
    pool: dict[str, dict] = {}
    for f in sorted(data_dir.glob("*_perturbed.json")):
        for d in load_records(f, _QA + ("perturbed_answer",), what="QA items"):
            pool.setdefault(d["question"], d)
    out = []
    for i, d in enumerate(items):
        src = pool.get(d["question"])
        if src is None:
            raise EvalDataError(f"{direct}: item {i} has no 'perturbed_answer' and its question is in no "
                                f"*_perturbed.json file of {data_dir}")
        out.append({**src, **d})
    return out


def _check_perturbed(items: list[dict], name: str) -> None:
    for i, d in enumerate(items):
        p = d["perturbed_answer"]
        if isinstance(p, str):
            d["perturbed_answer"] = [p]
        elif not p:
            raise EvalDataError(f"TOFU split {name}: item {i} field 'perturbed_answer' is an empty list")


# -- metrics --------------------------------------------------------------------------------

def truth_ratio_values(para_loss: Sequence[float], pert_loss: Sequence[Sequence[float]]) -> np.ndarray:
    """Per item ``exp(mean_j pert_loss[i][j] - para_loss[i])`` (the reference's statistic)."""
    para = np.asarray(para_loss, dtype=np.float64)
    pert = np.array([np.mean(p) for p in pert_loss], dtype=np.float64)
    return np.exp(pert - para)


def truth_ratio_stat(r: Sequence[float], forget: bool) -> float:
    """Forget set: ``mean(min(r, 1/r))``; other sets: ``mean(max(0, 1 - 1/r))``."""
    r = np.asarray(r, dtype=np.float64)
    if forget:
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r)))


def forget_quality(model_ratios: Sequence[float], retain_ratios: Sequence[float]) -> tuple[float, float]:
    """``(p-value, statistic)`` of the two-sample KS test between truth-ratio samples."""
    from scipy.stats import ks_2samp

    if len(model_ratios) == 0 or len(retain_ratios) == 0:
        raise ValueError(f"forget quality needs non-empty truth-ratio lists (model={len(model_ratios)}, "
                         f"retain={len(retain_ratios)})")
    res = ks_2samp(np.asarray(model_ratios, dtype=np.float64), np.asarray(retain_ratios, dtype=np.float64))
    return float(res.pvalue), float(res.statistic)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values (0 if any is 0)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("harmonic mean of an empty list")
    if any(x < 0 or not math.isfinite(x) for x in v):
        raise ValueError(f"harmonic mean needs finite non-negative values, got {v}")
    if any(x == 0 for x in v):
        return 0.0
    return len(v) / sum(1.0 / x for x in v)


def eval_qa_set(model, tokenizer, items: list[dict], *, forget: bool, template: str = TEMPLATE,
                batch_size: int = 16, score_batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
                meter: Meter | None = None, stage: str = "tofu", progress: bool = False) -> dict:
    """Prob, ROUGE, truth ratio (and the raw per-item ratios) on one QA set."""
    from qru.model.generate import generate

    meter = meter or Meter()
    has_para = all("paraphrased_answer" in d for d in items)
    prompts = [template.format(question=d["question"]) for d in items]
    # Score all answers of all items in one batched pass: gt, paraphrase, perturbed...
    texts, pro, spans = [], [], []
    for p, d in zip(prompts, items):
        answers = [d["answer"]] + ([d["paraphrased_answer"]] if has_para else []) + list(d["perturbed_answer"])
        spans.append((len(texts), len(answers)))
        texts += [p + a for a in answers]
        pro += [p] * len(answers)
    t0 = time.perf_counter()
    scores = score_sequences(model, tokenizer, texts, batch_size=score_batch_size, prompts=pro, stats=False)
    meter.add(stage + "_score", sum(len(tokenizer.encode(t)) for t in texts), time.perf_counter() - t0)
    losses = [s.loss for s in scores]

    t0 = time.perf_counter()
    gens = generate(model, tokenizer, [p.rstrip(" ") for p in prompts], max_new_tokens=max_new_tokens,
                    batch_size=batch_size, progress=progress)
    meter.add(stage + "_generate", sum(len(tokenizer.encode(p.rstrip(" "))) for p in prompts)
              + sum(len(tokenizer.encode(g, bos=False)) for g in gens), time.perf_counter() - t0)

    log, gt_loss, para_loss, pert_loss, probs, rouges = [], [], [], [], [], []
    for i, ((s, n), d, g) in enumerate(zip(spans, items, gens)):
        ls = losses[s:s + n]
        gl = ls[0]
        pl = ls[1] if has_para else ls[0]
        pe = ls[2:] if has_para else ls[1:]
        if has_para:
            prob = math.exp(-gl)
        else:
            pt = math.exp(-gl)
            prob = pt / (pt + sum(math.exp(-x) for x in pe))
        _, rec = rouge_l(d["answer"], g, use_stemmer=True)
        gt_loss.append(gl)
        para_loss.append(pl)
        pert_loss.append(pe)
        probs.append(prob)
        rouges.append(rec)
        log.append({"i": i, "question": d["question"], "output": g, "prob": prob, "rougeL_r": rec,
                    "gt_loss": gl, "paraphrased_loss": pl, "perturbed_loss": pe})
    ratios = truth_ratio_values(para_loss, pert_loss)
    for x, r in zip(log, ratios):
        x["truth_ratio"] = float(r)
    return {"prob": float(np.mean(probs)), "rouge": float(np.mean(rouges)),
            "truth_ratio": truth_ratio_stat(ratios, forget), "truth_ratios": [float(r) for r in ratios],
            "items": log}


def forget_truth_ratios(model, tokenizer, data_dir: str | Path, *, forget_split: str = "forget10",
                        limit: int | None = None, template: str = TEMPLATE, score_batch_size: int = 16) -> list[float]:
    """A (retain) model's per-item truth ratios on the forget split: scoring only, no generation."""
    items = take(load_split(data_dir, forget_split), limit)
    _check_perturbed(items, forget_split)
    prompts = [template.format(question=d["question"]) for d in items]
    texts, pro = [], []
    for p, d in zip(prompts, items):
        answers = [d.get("paraphrased_answer", d["answer"])] + list(d["perturbed_answer"])
        texts += [p + a for a in answers]
        pro += [p] * len(answers)
    losses = [s.loss for s in score_sequences(model, tokenizer, texts, batch_size=score_batch_size,
                                               prompts=pro, stats=False)]
    para, pert, j = [], [], 0
    for d in items:
        n = 1 + len(d["perturbed_answer"])
        para.append(losses[j])
        pert.append(losses[j + 1:j + n])
        j += n
    return [float(r) for r in truth_ratio_values(para, pert)]


def evaluate_tofu(model, tokenizer, data_dir: str | Path, *, forget_split: str = "forget10",
                  retain_split: str = "retain_perturbed", extra_splits: Sequence[str] | None = None,
                  retain_truth_ratios: Sequence[float] | None = None, limit: int | None = None,
                  batch_size: int = 16, score_batch_size: int = 16, template: str = TEMPLATE,
                  max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False) -> dict:
    """Run TOFU on one model: forget-set and utility-set metrics.

    ``retain_truth_ratios`` are a retain model's per-item ``truth_ratios`` on the same forget
    items (``evaluate_tofu(retain_model, ...)["forget_truth_ratios"]``); with them the result
    holds ``forget_quality`` (KS p-value), else None. ``extra_splits`` (default: the real
    authors / world facts sets) join model utility when their files exist.
    """
    if "{question}" not in template:
        raise ValueError(f"template must contain '{{question}}', got {template!r}")
    take([], limit)
    sets = {"forget": load_split(data_dir, forget_split), "retain": load_split(data_dir, retain_split)}
    for name in (EXTRA_SPLITS if extra_splits is None else extra_splits):
        if (Path(data_dir) / f"{name}.json").is_file():
            sets[name] = load_split(data_dir, name)
        elif extra_splits is not None:
            raise FileNotFoundError(f"TOFU split file not found: {Path(data_dir) / f'{name}.json'}")
    for k in sets:
        sets[k] = take(sets[k], limit)
        _check_perturbed(sets[k], k)
    if retain_truth_ratios is not None and len(retain_truth_ratios) != len(sets["forget"]):
        raise ValueError(f"retain_truth_ratios has {len(retain_truth_ratios)} values but the forget split "
                         f"{forget_split!r} has {len(sets['forget'])} items (use the same split and limit)")

    meter = Meter()
    res = {}
    was_training = model.training
    model.eval()
    try:
        for name, items in sets.items():
            res[name] = eval_qa_set(model, tokenizer, items, forget=(name == "forget"), template=template,
                                    batch_size=batch_size, score_batch_size=score_batch_size,
                                    max_new_tokens=max_new_tokens, meter=meter, stage=name, progress=progress)
    finally:
        model.train(was_training)
    out: dict = {"forget_split": forget_split, "retain_split": retain_split}
    for name, r in res.items():
        pre = name if name in ("forget", "retain") else name.removesuffix("_perturbed")
        out[f"{pre}_prob"], out[f"{pre}_rouge"], out[f"{pre}_truth_ratio"] = r["prob"], r["rouge"], r["truth_ratio"]
    out["forget_truth_ratios"] = res["forget"]["truth_ratios"]
    out["forget_quality"] = out["ks_stat"] = None
    if retain_truth_ratios is not None:
        out["forget_quality"], out["ks_stat"] = forget_quality(res["forget"]["truth_ratios"], retain_truth_ratios)
    util = [v for name, r in res.items() if name != "forget" for v in (r["prob"], r["rouge"], r["truth_ratio"])]
    out["model_utility"] = harmonic_mean(util)
    out["utility_sets"] = [n for n in res if n != "forget"]
    out["items"] = {name: r["items"] for name, r in res.items()}
    out["n_items"] = {name: len(r["items"]) for name, r in res.items()}
    out["throughput"] = meter.summary()
    return out

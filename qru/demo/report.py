"""Demo outputs: ``results.json`` (records), ``conclusions.json`` and ``report.md`` (tables and a
conclusion computed from the records, never written by hand), PNG plots.

Every number of the conclusion is derived from ``results.json`` alone by :func:`conclusions`:

* an *effect* is a paired difference per (method, unlearning seed), e.g. KnowMem_f at 4-bit minus
  KnowMem_f at bf16 of the same unlearned model, averaged over methods, then over seeds;
* its 95% interval uses a Student-t critical value: k unlearning seeds give k - 1 degrees of freedom
  for the seed-to-seed noise, combined with the noise of the finite evaluation items
  (Welch-Satterthwaite); see :mod:`qru.demo.stats`. The corpus, base, target and retrain models are
  fixed within a run, so the seed noise is that of the unlearning stage (data order, LoRA init);
* the effect is *shown* when its interval excludes 0 and ``|effect| >= MIN_EFFECT`` points; with one
  seed nothing can be shown. Each comparison of the report is tested on its own (no multiplicity
  correction; ``qru sweep`` applies Holm's across its grid).
"""
from __future__ import annotations

import io
import json
import math
import os
import platform
import statistics
from pathlib import Path

from qru.demo import stats
from qru.demo.effects import (MIN_EFFECT, effect, effect_stats, gap_pm_text, matching, num, paired, paired_items,
                              pct, pm_text, shown_word, unlearned_keys, value_of)
from qru.demo.presets import TABLE_FORMATS
from qru.demo.stages import atomic_write_json, atomic_write_text
from qru.demo.tables import METHOD_LABEL, generation_lengths, paper_table, precision_table, survival_table
from qru.io import write_bytes

TARGET_GAP = 10.0  # the target "knows" the forget facts: KnowMem_f(target) - KnowMem_f(retrain) >= this
FORGET_FRACTION = 0.5  # an unlearned model "forgets": it removes >= half of the target-retrain KnowMem_f gap
RECORD_KEYS = ("method", "mode", "precision", "verbmem_f", "knowmem_f", "knowmem_r", "privleak")


# -- conclusions ----------------------------------------------------------------------------

def sanity(records, utility_bound: float) -> dict:
    """The checks that make the experiment meaningful, from the bf16 records."""
    kt = value_of(records, "knowmem_f", mode="target", precision="bf16")
    kr = value_of(records, "knowmem_f", mode="retrain", precision="bf16")
    ut = value_of(records, "knowmem_r", mode="target", precision="bf16")
    gap = kt - kr if kt is not None and kr is not None else None
    out = {"target_knowmem_f": kt, "retrain_knowmem_f": kr, "target_gap": gap,
           "target_knows": gap is not None and gap >= TARGET_GAP, "target_utility": ut, "modes": {}}
    for mode in ("full", "lora"):
        rs = matching(records, mode=mode, precision="bf16")
        if not rs or gap is None:
            continue
        removed = statistics.fmean((kt - r["knowmem_f"]) / gap for r in rs) if gap > 0 else None
        per_model = [{"model": r.get("model"), "utility_drop": (ut - r["knowmem_r"]) / ut,
                      "holds": (ut - r["knowmem_r"]) / ut <= utility_bound} for r in rs] if ut else []
        drops = [m["utility_drop"] for m in per_model]
        out["modes"][mode] = {
            "forgotten_fraction": removed, "forgets": removed is not None and removed >= FORGET_FRACTION,
            "utility_drop_mean": statistics.fmean(drops) if drops else None,
            "utility_drop_max": max(drops) if drops else None,
            "utility_per_model": per_model,
            "utility_models_within": sum(m["holds"] for m in per_model),
            "utility_holds": bool(per_model) and all(m["holds"] for m in per_model)}
    out["utility_bound"] = utility_bound
    return out


def conclusions(records, table_format: str = "nf4", utility_bound: float = 0.25) -> dict:
    """Every computed claim of the report, from the records alone."""
    formats = [f for f in TABLE_FORMATS if any(r["precision"] == f for r in records)]
    c = {"table_format": table_format, "formats": formats, "min_effect": MIN_EFFECT,
         "sanity": sanity(records, utility_bound), "restore": {}, "utility": {}, "privleak": {}}
    for fmt in formats:
        for mode in ("full", "lora"):
            d, it = paired_items(records, "knowmem_f", {"mode": mode, "precision": fmt},
                                 {"mode": mode, "precision": "bf16"})
            st = effect_stats(d, it)
            kt = value_of(records, "knowmem_f", mode="target", precision="bf16")
            gaps = [kt - value_of(records, "knowmem_f", method=m, seed=s, mode=mode, precision="bf16")
                    for (m, s) in d] if kt is not None else []
            gap = statistics.fmean(gaps) if gaps else None
            st["forgotten_at_bf16"] = gap
            tq = value_of(records, "knowmem_f", mode="target", precision=fmt)
            st["target_change"] = tq - kt if tq is not None and kt is not None else None
            st["restored_fraction"] = st["effect"] / gap if st["effect"] is not None and gap and gap > 0 else None
            c["restore"].setdefault(fmt, {})[mode] = st
        loss = {mode: effect(records, "knowmem_r", {"mode": mode, "precision": fmt}, {"mode": mode, "precision": "bf16"})
                for mode in ("full", "lora")}
        dd = {k: v - paired(records, "knowmem_r", {"mode": "full", "precision": fmt},
                            {"mode": "full", "precision": "bf16"}).get(k, float("nan"))
              for k, v in paired(records, "knowmem_r", {"mode": "lora", "precision": fmt},
                                 {"mode": "lora", "precision": "bf16"}).items()}
        c["utility"][fmt] = {"lora_minus_full": effect(records, "knowmem_r", {"mode": "lora", "precision": fmt},
                                                       {"mode": "full", "precision": fmt}),
                             "quant_loss": loss,
                             "lora_minus_full_quant_loss": effect_stats({k: v for k, v in dd.items()
                                                                         if not math.isnan(v)})}
        pl = {}
        for mode in ("full", "lora"):
            move = effect_stats(paired(records, "privleak", {"mode": mode, "precision": fmt},
                                       {"mode": mode, "precision": "bf16"}))
            at_bf16 = [r["privleak"] for r in matching(records, mode=mode, precision="bf16") if r["privleak"] is not None]
            at_q = [r["privleak"] for r in matching(records, mode=mode, precision=fmt) if r["privleak"] is not None]
            move["bf16_mean"] = statistics.fmean(at_bf16) if at_bf16 else None
            move["quant_mean"] = statistics.fmean(at_q) if at_q else None
            gap = stats.effect_stats(paired(records, "min_k_gap", {"mode": mode, "precision": fmt},
                                      {"mode": mode, "precision": "bf16"}))
            gb = [r["min_k_gap"] for r in matching(records, mode=mode, precision="bf16") if r.get("min_k_gap") is not None]
            gq = [r["min_k_gap"] for r in matching(records, mode=mode, precision=fmt) if r.get("min_k_gap") is not None]
            gap["bf16_mean"] = statistics.fmean(gb) if gb else None
            gap["quant_mean"] = statistics.fmean(gq) if gq else None
            move["min_k_gap"] = gap
            pl[mode] = move
        absd = {}
        for (m, s) in unlearned_keys(records):
            a = value_of(records, "privleak", method=m, seed=s, mode="lora", precision=fmt)
            b = value_of(records, "privleak", method=m, seed=s, mode="full", precision=fmt)
            if a is not None and b is not None:
                absd[(m, s)] = abs(a) - abs(b)
        pl["lora_minus_full_abs"] = effect_stats(absd)
        c["privleak"][fmt] = pl
    c["answers"] = answers(c)
    return c


def _restore_sentence(st: dict, mode_name: str, fmt: str) -> str:
    if st["effect"] is None:
        return f"{mode_name}: no records."
    frac = (f" = {100 * st['restored_fraction']:.0f}% of the {num(st['forgotten_at_bf16'])} points forgotten at "
            f"bf16" if st.get("restored_fraction") is not None else "")
    if st["shown"] and st["effect"] > 0:
        verdict = f"YES: {fmt} restores forgotten knowledge"
    elif st["shown"]:
        verdict = f"NO, the opposite: {fmt} removes more knowledge"
    else:
        verdict = f"NO effect shown: {fmt} does not restore forgotten knowledge beyond the noise"
    ref = st.get("target_change")
    ref = (f" For reference, the target's own KnowMem_f changes by {num(ref, sign=True)} at {fmt}."
           if ref is not None else "")
    return f"{mode_name}: {verdict}; KnowMem_f({fmt}) - KnowMem_f(bf16) = {pm_text(st)}{frac}.{ref}"


def answers(c: dict) -> dict:
    """The three questions, answered in words from the computed numbers (headline: table format)."""
    fmt = c["table_format"]
    out = {}
    r = c["restore"].get(fmt, {})
    out["q1_restore"] = [_restore_sentence(r[m], name, fmt) for m, name in (("full", "Full fine-tuning"),
                                                                           ("lora", "LoRA (merged, then quantized)"))
                         if m in r]
    for f in c["formats"]:
        if f != fmt:
            rr = c["restore"][f]
            out["q1_restore"].append(
                f"Other format {f}: full {num(rr['full']['effect'], sign=True) if 'full' in rr else 'n/a'}"
                f" ({'shown' if rr.get('full', {}).get('shown') else 'not shown'}), LoRA "
                f"{num(rr['lora']['effect'], sign=True) if 'lora' in rr else 'n/a'}"
                f" ({'shown' if rr.get('lora', {}).get('shown') else 'not shown'}).")
    u = c["utility"].get(fmt)
    if u:
        st = u["lora_minus_full"]
        if st["effect"] is None:
            verdict = "cannot tell (no paired records)"
        elif st["shown"] and st["effect"] > 0:
            verdict = "YES, LoRA keeps more utility"
        elif st["shown"]:
            verdict = "NO, full fine-tuning keeps more utility"
        else:
            verdict = "NO difference shown"
        ql = u["quant_loss"]
        out["q2_utility"] = [
            f"At {fmt}: {verdict}; Utility(LoRA) - Utility(full) = {pm_text(st)}.",
            f"Utility change from bf16 to {fmt}: full {pm_text(ql['full'])} ({shown_word(ql['full'])}); LoRA "
            f"{pm_text(ql['lora'])} ({shown_word(ql['lora'])}); difference (LoRA - full) "
            f"{pm_text(u['lora_minus_full_quant_loss'])} ({shown_word(u['lora_minus_full_quant_loss'])})."]
    p = c["privleak"].get(fmt)
    if p:
        lines = []
        for mode, name in (("full", "Full fine-tuning"), ("lora", "LoRA")):
            st = p[mode]
            if st["effect"] is None:
                continue
            a, b = st["bf16_mean"], st["quant_mean"]
            if not st["shown"]:
                where = "no move beyond the noise"
            elif abs(b) < abs(a):
                where = "toward 0 (closer to the retrain model)"
            else:
                where = "away from 0 (" + ("more leak" if b < 0 else "more over-unlearning") + ")"
            sign = "negative: the forget set still looks like training data" if b is not None and b < 0 else \
                "positive: the forget set looks less familiar than unseen text (over-unlearning)"
            sat = " (-100 is the floor: forget and holdout texts perfectly separated)" if b is not None and \
                b <= -99.95 else ""
            lines.append(f"{name}: PrivLeak goes from {num(a)} (bf16) to {num(b)} ({fmt}): {where}; change "
                         f"{pm_text(st)}; at {fmt} it is {sign}{sat}.")
            g = st.get("min_k_gap") or {}
            if g.get("effect") is not None:
                lines.append(f"{name}: the scaled Min-40% gap (target 1, retrain 0) goes from {num(g['bf16_mean'], 2)} "
                             f"(bf16) to {num(g['quant_mean'], 2)} ({fmt}); change {gap_pm_text(g)}: "
                             + ("toward the target (more membership signal)." if g["shown"] and g["effect"] > 0 else
                                "toward the retrain model." if g["shown"] else "no move shown."))
        st = p["lora_minus_full_abs"]
        lines.append(f"|PrivLeak(LoRA)| - |PrivLeak(full)| at {fmt} = {pm_text(st)}: "
                     + ("LoRA leaks less." if st["shown"] and st["effect"] < 0 else
                        "full fine-tuning leaks less." if st["shown"] else "no difference shown."))
        out["q3_privleak"] = lines
    return out


# -- plots -----------------------------------------------------------------------------------

def plots(records, precisions, fmt: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = list(range(len(precisions)))
    for ax, (metric, title) in zip(axes, (("knowmem_f", "KnowMem on forget (lower = forgotten)"),
                                          ("knowmem_r", "Utility: KnowMem on retain"),
                                          ("privleak", "PrivLeak (0 = like retrain)"))):
        for mode, style in (("target", "k-"), ("retrain", "k--"), ("full", "C0o-"), ("lora", "C1s-")):
            ys, es = [], []
            for p in precisions:
                v = [r[metric] for r in matching(records, mode=mode, precision=p) if r[metric] is not None]
                ys.append(statistics.fmean(v) if v else float("nan"))
                es.append(statistics.stdev(v) if len(v) > 1 else 0.0)
            ax.errorbar(x, ys, yerr=es, fmt=style, capsize=3, label=mode if mode in ("target", "retrain")
                        else f"unlearned ({'full FT' if mode == 'full' else 'LoRA'})")
        ax.set_xticks(x, precisions)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MUSE metrics by precision (mean ± sd over unlearning methods and seeds)")
    fig.tight_layout()
    written.append(_save(fig, out / "precision_effect.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for mode, color in (("full", "C0"), ("lora", "C1")):
        for (m, s) in unlearned_keys(records):
            a = matching(records, method=m, seed=s, mode=mode, precision="bf16")
            b = matching(records, method=m, seed=s, mode=mode, precision=fmt)
            if not a or not b:
                continue
            a, b = a[0], b[0]
            ax.annotate("", xy=(b["knowmem_f"], b["knowmem_r"]), xytext=(a["knowmem_f"], a["knowmem_r"]),
                        arrowprops=dict(arrowstyle="->", color=color, alpha=0.7))
            ax.plot([a["knowmem_f"]], [a["knowmem_r"]], "o", color=color, ms=4)
    for mode, mk in (("target", "k*"), ("retrain", "kx")):
        r = matching(records, mode=mode, precision="bf16")
        if r:
            ax.plot([r[0]["knowmem_f"]], [r[0]["knowmem_r"]], mk, ms=10, label=mode)
    ax.plot([], [], "C0o-", label="full FT: bf16 → " + fmt)
    ax.plot([], [], "C1o-", label="LoRA: bf16 → " + fmt)
    ax.set_xlabel("KnowMem_f (forget knowledge, lower is better)")
    ax.set_ylabel("Utility = KnowMem_r (higher is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"What {fmt} quantization does to each unlearned model")
    fig.tight_layout()
    written.append(_save(fig, out / "tradeoff.png"))
    plt.close(fig)
    return written


def _save(fig, path: Path, dpi: int = 110) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return write_bytes(path, buf.getvalue())


# -- report ----------------------------------------------------------------------------------

def _methods_line(records) -> str:
    ms = sorted({r["method"] for r in records if r["mode"] in ("full", "lora")},
                key=lambda m: list(METHOD_LABEL).index(m) if m in METHOD_LABEL else 99)
    modes = sorted({r["mode"] for r in records if r["mode"] in ("full", "lora")})
    seeds = sorted({r["seed"] for r in records if r["seed"] is not None})
    return (f"methods {', '.join(METHOD_LABEL.get(m, m) for m in ms)}; modes {', '.join(modes)}; "
            f"unlearning seeds {', '.join(map(str, seeds))}")


def render_utility_line(mode: str, v: dict, bound: float) -> str:
    """The sanity line of one mode: share of the gap forgotten, and the utility bound checked per model."""
    return (f"- Unlearned ({mode}) at bf16 removes {pct(v['forgotten_fraction'])} of the target-retrain "
            f"KnowMem_f gap (mean over methods and seeds; forgets = >= {100 * FORGET_FRACTION:.0f}%): "
            f"**{'yes' if v['forgets'] else 'NO'}**. Utility loss vs the target: mean "
            f"{pct(v['utility_drop_mean'])}, worst {pct(v['utility_drop_max'])}; bound {100 * bound:.0f}% per "
            f"model: within it for {v['utility_models_within']} of {len(v['utility_per_model'])} models ("
            + (", ".join(f"{m['model']} {pct(m['utility_drop'])}" for m in v["utility_per_model"])
               or "no target utility to lose")
            + f"): **{'holds' if v['utility_holds'] else 'EXCEEDED'}**.")


def render(run, c: dict) -> str:
    cfg, records = run.cfg, run.records
    fmt = cfg.eval.table_format
    s = c["sanity"]
    L = [f"# qru demo report — preset `{cfg.name}`, seed {run.seed}", ""]
    L.append(f"Ran: {_methods_line(records)}. All four methods x both modes run in the `full` preset; "
             f"this run's set is listed here." if cfg.name != "full" else f"Ran: {_methods_line(records)}.")
    if cfg.note:
        L.append(f"Preset: {cfg.note}.")
    m = cfg.model
    L += ["", f"Model: Llama, hidden {m.hidden}, {m.layers} layers, vocab {run.meta['stages'].get('tokenizer', {}).get('vocab_size')}"
          f", {run.meta['stages'].get('base', {}).get('params', 0):,} parameters. Base pre-trained on `general.txt` "
          f"({cfg.base.epochs} epochs, lr {cfg.base.lr:g}); target = base fine-tuned on forget + retain, "
          f"retrain = base fine-tuned on retain ({cfg.target.epochs} epochs, lr {cfg.target.lr:g}). Unlearning: "
          f"{cfg.unlearn.epochs} epochs, lr {cfg.unlearn.lr_full:g} (full) / {cfg.unlearn.lr_lora:g} (LoRA rank "
          f"{cfg.unlearn.rank}), {cfg.unlearn.master_dtype} master weights. LoRA adapters are merged into the fp32 "
          f"target, then the model is cast (bf16) or quantized in memory (`qru.quant.quantize_model`, the code path "
          f"of `qru quantize`; block size {cfg.eval.block_size or 'format default'}; lm_head "
          f"{'quantized too (eval.quantize_head)' if cfg.eval.quantize_head else 'not quantized, as bitsandbytes'}"
          f"; full-FT unlearning trains {'the linears only' if cfg.unlearn.train == 'linears' else 'all parameters'}).",
          f"MUSE metrics on the first {cfg.eval.limit} items of each set: VerbMem and KnowMem are mean ROUGE-L F1 "
          f"x100 (as MUSE; KnowMem's ROUGE-L recall is in results.json), {generation_lengths(cfg)}; PrivLeak "
          f"against the retrain model's bf16 AUC ({num(run.meta['retrain_auc'], 3)}).", ""]

    L += ["## Is this a real experiment?", ""]
    L.append(f"- The target knows the forget facts: KnowMem_f target {num(s['target_knowmem_f'])} vs retrain "
             f"{num(s['retrain_knowmem_f'])} (gap {num(s['target_gap'])}; required >= {TARGET_GAP:g}): "
             f"**{'yes' if s['target_knows'] else 'NO'}**.")
    for mode, v in s["modes"].items():
        L.append(render_utility_line(mode, v, s["utility_bound"]))
    valid = s["target_knows"] and all(v["forgets"] for v in s["modes"].values())
    if not valid:
        L.append("- **Caveat:** a check above failed, so the effects below are measured on a setting that does not "
                 "reproduce the paper's precondition; read them as such.")
    L.append("")

    L += [f"## Paper-style table (4-bit = {fmt})", "",
          "Mean ± sd over unlearning seeds. Full = bf16 model of full-FT unlearning; Full+LoRA = bf16 model with the "
          "LoRA adapter merged; 4-bit = the same models quantized.", ""]
    L += paper_table(records, fmt)
    L += ["", "## Conclusion (computed from results.json)", "",
          f"Effects are paired differences per (method, unlearning seed), averaged over methods, then seeds. "
          f"Intervals are 95% Student-t intervals: k unlearning seeds give k - 1 degrees of freedom for the "
          f"seed-to-seed noise (the seeds vary data order and LoRA init; corpus and target are fixed), combined with "
          f"the noise of the finite eval items (Welch-Satterthwaite degrees of freedom). An effect counts as shown "
          f"when its interval excludes 0 and |effect| >= {MIN_EFFECT:g} points. Each comparison is tested on its "
          f"own (no multiplicity correction here; `qru sweep` applies Holm's over its grid).", ""]
    a = c["answers"]
    L.append("**1. Does 4-bit quantization restore forgotten knowledge?**")
    L += [f"- {x}" for x in a.get("q1_restore", [])]
    L += ["", "**2. Does LoRA keep more utility at 4 bits?**"]
    L += [f"- {x}" for x in a.get("q2_utility", [])]
    L += ["", "**3. Where does PrivLeak move?**"]
    L += [f"- {x}" for x in a.get("q3_privleak", [])]
    L += ["", "## Every precision", "", "KnowMem_f (forget):", ""]
    L += precision_table(records, "knowmem_f", cfg.eval.precisions)
    L += ["", "Utility (KnowMem_r):", ""]
    L += precision_table(records, "knowmem_r", cfg.eval.precisions)
    L += ["", "PrivLeak:", ""]
    L += precision_table(records, "privleak", cfg.eval.precisions)
    L += ["", "Min-40% gap, scaled (target at bf16 = 1, retrain at bf16 = 0): the mean Min-40% score of the holdout "
          "texts minus that of the forget texts, which unlike PrivLeak's AUC does not saturate when the sets "
          "separate. Single models show their paired-bootstrap 95% interval; unlearned rows show mean ± sd over "
          "seeds:", ""]
    L += precision_table(records, "min_k_gap", cfg.eval.precisions, nd=2)
    L += ["", "## Survival of the unlearning update under quantization (vs the target)", "",
          "projection = ⟨D, ΔW⟩/‖ΔW‖² with D = deq(Q(W+ΔW)) − deq(Q(W)): 1 = the quantized model keeps the update, "
          "0 = quantization erases it (`qru.quant.survival`; overall aggregate of the linear layers).", ""]
    L += survival_table(run.survival)
    L += ["", "## Plots", "", "![precision effect](precision_effect.png)", "", "![tradeoff](tradeoff.png)", "",
          "## Run", ""]
    comp = [k for k in run.computed]
    L.append(f"- Wall time of this run: **{run.wall_seconds:.0f} s** ({len(comp)} stages computed, "
             f"{len(run.cached)} cached) on {platform.machine()} with {os.cpu_count()} CPU cores; CPU time "
             f"{run.cpu_seconds:.0f} s (this process and the compiler; more than the wall time means both cores "
             f"were busy, much less means other processes shared the machine)"
             + (f"; C++ kernels built in the background in {run.kernel_seconds:.0f} s ("
                + ", ".join(f"{k} {v:.0f}s" for k, v in run.kernel_each.items()) + ")"
                if run.kernel_seconds and run.kernel_each else "") + ".")
    slow = sorted(((k, v) for k, v in run.stage_times.items() if k in comp), key=lambda kv: -kv[1])[:6]
    if slow:
        L.append("- Slowest computed stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in slow) + ".")
    L.append("- Files: results.json (one record per model x precision), conclusions.json, plots, stages/ (cache).")
    return "\n".join(L) + "\n"


def write_outputs(run) -> dict[str, Path]:
    out = Path(run.out)
    cfg = run.cfg
    c = conclusions(run.records, cfg.eval.table_format, cfg.eval.utility_bound)
    atomic_write_json(out / "results.json", run.records)
    atomic_write_json(out / "conclusions.json", _jsonable(c))
    paths = {"results": out / "results.json", "conclusions": out / "conclusions.json"}
    for p in plots(run.records, list(cfg.eval.precisions), cfg.eval.table_format, out):
        paths[p.stem] = p
    atomic_write_text(out / "report.md", render(run, c))
    paths["report"] = out / "report.md"
    a = c["answers"]
    sa = c["sanity"]
    pre = (f"Setting: target KnowMem_f {num(sa['target_knowmem_f'])} vs retrain {num(sa['retrain_knowmem_f'])} "
           f"({'the target knows the forget facts' if sa['target_knows'] else 'the target does NOT know the facts'})"
           + "".join(f"; {m} unlearning removes {pct(v['forgotten_fraction'])} of that gap at bf16, utility -"
                     f"{pct(v['utility_drop_mean'])}" for m, v in sa["modes"].items()))
    run.headline = ([pre, "Does 4-bit restore forgotten knowledge?"] + [f"  {x}" for x in a.get("q1_restore", [])[:2]]
                    + ["Does LoRA keep more utility at 4 bits?"] + [f"  {x}" for x in a.get("q2_utility", [])[:1]]
                    + ["Where does PrivLeak move?"] + [f"  {x}" for x in a.get("q3_privleak", [])[:2]])
    atomic_write_json(out / "run.json", {"preset": cfg.name, "seed": run.seed, "config": cfg.to_dict(),
                                         "wall_seconds": round(run.wall_seconds, 2),
                                         "cpu_seconds": round(run.cpu_seconds, 2),
                                         "kernel_build": run.kernel_each,
                                         "kernel_build_seconds": run.kernel_seconds,
                                         "computed": run.computed, "cached": run.cached,
                                         "stage_seconds": run.stage_times, "survival": run.survival,
                                         "meta": run.meta})
    return paths


def _jsonable(o):
    if isinstance(o, dict):
        return {("|".join(map(str, k)) if isinstance(k, tuple) else k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(x) for x in o]
    return o


def load_results(path) -> list[dict]:
    return json.loads(Path(path).read_text())

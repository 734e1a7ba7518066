"""``qru sweep``: the demo pipeline over a one-factor-at-a-time grid of knobs around a preset
(``--preset pretrained``: a full grid of the pretrained experiment, :mod:`qru.demo.pretrained_sweep`).

Every point is a full demo run (``qru.demo.pipeline.run_demo``) in ``OUT/points/<knob>=<value>``;
all points share one stage cache (``OUT/stages``), so e.g. an unlearning-LR point reuses the base,
target and retrain models of the centre point. Per point and 4-bit format the sweep reports

* restored = KnowMem_f(4-bit) - KnowMem_f(bf16) of the same unlearned model (Zhang et al.'s effect),
* utility loss = KnowMem_r(bf16) - KnowMem_r(4-bit) (the seed paper's: smaller with LoRA?),

each with its 95% Student-t interval and p-value (``qru.demo.stats``), for full FT and LoRA, plus the
bf16 sanity numbers (does the target know the facts, do the unlearned models forget).

The sweep makes many comparisons, so "shown" is decided after Holm's step-down correction over the
whole family (:data:`FAMILY`: every point x 4-bit format x effect); the unadjusted decision is kept as
``shown_unadjusted`` and the adjusted p-value as ``p_holm``.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from qru.demo import report as rpt
from qru.demo import stats
from qru.demo.pipeline import run_demo
from qru.demo.presets import FOUR_BIT, DemoConfig, PresetError, apply_overrides, get_preset
from qru.demo.pretrained_sweep import run_pretrained_sweep
from qru.demo.stages import atomic_write_json, atomic_write_text

# knob -> values; the preset's own value is the centre point
DEFAULT_KNOBS: dict[str, tuple] = {
    "model.hidden": (64, 128, 192),
    "target.epochs": (20, 40, 80),
    "target.lr": (5e-4, 2e-3),
    "unlearn.master_dtype": ("fp32", "bf16"),
    "unlearn.lr_full": (1e-5, 3e-5, 1e-4, 3e-4),
    "unlearn.epochs": (2, 5, 10),
}
# extra points changing several knobs at once (the mechanisms that need two of them together)
DEFAULT_COMBOS: tuple[dict, ...] = (
    {"unlearn.master_dtype": "bf16", "unlearn.lr_full": 1e-5},
    {"unlearn.master_dtype": "bf16", "unlearn.lr_full": 3e-5},
    # the mechanism regime again, with quantization-aware full FT beside full and LoRA (shares their stages)
    {"unlearn.master_dtype": "bf16", "unlearn.lr_full": 1e-5, "unlearn.modes": ("full", "lora", "quant_aware")},
)
KNOB_NOTE = {
    "model.hidden": "width (fan-in): the update-to-quantization-step ratio shrinks with width",
    "target.epochs": "target training length (passes over forget + retain): how over-fit the target is",
    "target.lr": "fine-tuning LR of base -> target: a smaller LR makes the target base + a smaller delta",
    "unlearn.master_dtype": "bf16 weights without an fp32 master copy: small steps are lost below a bf16 ulp",
    "unlearn.lr_full": "full-FT unlearning learning rate (LoRA keeps its own)",
    "unlearn.epochs": "unlearning length",
}


def parse_knobs(items: list[str] | None) -> dict[str, tuple[str, ...]]:
    """``["model.hidden=64,128"]`` -> ``{"model.hidden": ("64", "128")}``."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise PresetError(f"knob {it!r} must look like SECTION.FIELD=V1,V2,...")
        k, v = it.split("=", 1)
        vals = tuple(x.strip() for x in v.split(",") if x.strip())
        if not vals:
            raise PresetError(f"knob {k!r} has no values")
        out[k.strip()] = vals
    return out


def parse_combos(items: list[str] | None) -> list[dict]:
    """``["unlearn.master_dtype=bf16,unlearn.lr_full=1e-5"]`` -> ``[{...: "bf16", ...: "1e-5"}]``."""
    out = []
    for it in items or []:
        d = {}
        for part in it.split(","):
            if "=" not in part:
                raise PresetError(f"combo {it!r} must look like K1=V1,K2=V2")
            k, v = part.split("=", 1)
            d[k.strip()] = v.strip()
        out.append(d)
    return out


def _label(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def grid(base: DemoConfig, knobs: dict, combos=()) -> list[tuple[str, str | None, object, DemoConfig]]:
    """``(label, knob, value, config)`` for the centre, every one-factor change and every combo
    (knob ``"combo"``); duplicates dropped."""
    points = [("centre", None, None, base)]
    seen = {rpt_key(base)}
    for combo in combos:
        cfg = apply_overrides(base, combo)
        if rpt_key(cfg) in seen:
            continue
        seen.add(rpt_key(cfg))
        label = "+".join(f"{k}={_label(_get(cfg, k))}" for k in combo)
        points.append((label, "combo", label, cfg))
    for knob, values in knobs.items():
        for v in values:
            cfg = apply_overrides(base, {knob: v})
            k = rpt_key(cfg)
            if k in seen:
                continue
            seen.add(k)
            value = _get(cfg, knob)
            points.append((f"{knob}={_label(value)}", knob, value, cfg))
    return points


def rpt_key(cfg: DemoConfig) -> str:
    d = dataclasses.asdict(cfg)
    d.pop("name", None)
    d.pop("note", None)
    return repr(sorted(d.items()))


def _get(cfg: DemoConfig, knob: str):
    sec, name = knob.split(".")
    return getattr(getattr(cfg, sec), name)


def survival_means(survival: dict) -> dict:
    """``{mode: {fmt: {metric: mean over that mode's unlearned models}}}`` of the survival overall aggregates."""
    acc: dict = {}
    for key, v in survival.items():
        if v.get("status") != "done":
            continue
        mode = "lora" if "-lora-" in key else "full"
        for fmt, o in (v.get("overall") or {}).items():
            for m in ("projection", "survival_ratio", "code_flip_frac", "below_half_step_frac", "delta_rel_norm"):
                if o.get(m) is not None:
                    acc.setdefault(mode, {}).setdefault(fmt, {}).setdefault(m, []).append(o[m])
    return {mode: {f: {m: statistics.fmean(v) for m, v in d.items()} for f, d in fd.items()} for mode, fd in acc.items()}


def summarize_point(records, fmts, utility_bound: float = 1.0) -> dict:
    """Per format and mode: restored and utility-loss stats; bf16 sanity (utility bound checked per model)."""
    out = {"sanity": rpt.sanity(records, utility_bound), "formats": {}}
    for f in fmts:
        row = {}
        for mode in ("full", "lora"):
            rest = rpt.effect(records, "knowmem_f", {"mode": mode, "precision": f}, {"mode": mode, "precision": "bf16"})
            uloss = rpt.effect(records, "knowmem_r", {"mode": mode, "precision": "bf16"},
                               {"mode": mode, "precision": f})
            pl = rpt.effect(records, "privleak", {"mode": mode, "precision": f}, {"mode": mode, "precision": "bf16"})
            row[mode] = {"restored": rest, "utility_loss": uloss, "privleak_change": pl}
        row["lora_minus_full_utility"] = rpt.effect(records, "knowmem_r", {"mode": "lora", "precision": f},
                                                    {"mode": "full", "precision": f})
        if any(r["mode"] == "quant_aware" for r in records):  # quant-aware full FT (qru.demo.report)
            row["quant_aware"] = {"restored": rpt.effect(records, "knowmem_f", {"mode": "quant_aware", "precision": f},
                                                         {"mode": "quant_aware", "precision": "bf16"})}
            qa = rpt.quant_aware_effects(records, f, {"full": row["full"]["restored"],
                                                      "quant_aware": row["quant_aware"]["restored"]})
            row["qa_keep"], row["qa_minus_full"] = qa["keep"], qa["qa_minus_full"]
        out["formats"][f] = row
    return out


# The comparisons "shown" is decided over, per point and 4-bit format: (mode or None, summary key).
FAMILY: tuple[tuple[str | None, str], ...] = (("full", "restored"), ("lora", "restored"), ("full", "utility_loss"),
                                              ("lora", "utility_loss"), (None, "lora_minus_full_utility"))
# added to the family at the points that ran quant-aware full FT
QA_FAMILY: tuple[tuple[str | None, str], ...] = (("quant_aware", "restored"), (None, "qa_keep"),
                                                 (None, "qa_minus_full"))


def holm_family(results, fmts) -> int:
    """Apply Holm's correction in place over every (point x format x FAMILY effect) with a p-value: sets
    ``p_holm``, ``shown_unadjusted`` and ``shown`` (adjusted p < 0.05 and |effect| >= MIN_EFFECT).
    Returns the family size."""
    sts = []
    for r in results:
        for f in fmts:
            row = r["summary"]["formats"][f]
            for mode, key in FAMILY + (QA_FAMILY if "quant_aware" in row else ()):
                sts.append(row[key] if mode is None else row[mode][key])
    adj = stats.holm([st.get("p") for st in sts])
    for st, p in zip(sts, adj):
        st["shown_unadjusted"] = st.get("shown_unadjusted", st.get("shown", False))
        st["p_holm"] = p
        st["shown"] = bool(p is not None and p < stats.ALPHA and abs(st["effect"]) >= rpt.MIN_EFFECT)
    return sum(p is not None for p in adj)


def run_sweep(preset: str = "quick", out: str | os.PathLike | None = None, *, seed: int = 0,
              knobs: dict | None = None, combos: list[dict] | None = None, overrides: dict | None = None,
              force: bool = False, progress: bool = True, device: str = "cpu", threads: int | None = None) -> dict:
    """The sweep of ``preset``; ``pretrained``: :func:`qru.demo.pretrained_sweep.run_pretrained_sweep` (its
    own grid: lr x trained parameters x master dtype, every format)."""
    if preset == "pretrained":
        if device not in ("cpu", "auto"):
            raise ValueError(f"--device {device}: the pretrained sweep runs on the CPU")
        if combos:
            raise PresetError("the pretrained sweep is a full grid: give its values with --knob, not --combo")
        return run_pretrained_sweep(out or "runs/sweep-pretrained", seed=seed, knobs=knobs, overrides=overrides,
                                    force=force, progress=progress, threads=threads)
    t0 = time.perf_counter()
    base = get_preset(preset, overrides)
    if not knobs and combos is None:
        knobs, combos = DEFAULT_KNOBS, list(DEFAULT_COMBOS)
    knobs, combos = knobs or {}, combos or []
    base = apply_overrides(base, {"eval.precisions": ("bf16",) + FOUR_BIT})
    if base.eval.table_format not in base.eval.precisions:
        base = apply_overrides(base, {"eval.table_format": "nf4"})
    out = Path(out or f"runs/sweep-{preset}")
    out.mkdir(parents=True, exist_ok=True)
    points = grid(base, knobs, combos)
    print(f"qru sweep: {len(points)} points ({', '.join(p[0] for p in points)})", file=sys.stderr, flush=True)
    results = []
    for i, (label, knob, value, cfg) in enumerate(points):
        print(f"qru sweep: point {i + 1}/{len(points)}: {label}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        run = _run_point(cfg, out / "points" / label.replace("/", "_"), seed, force, progress, device, threads,
                         out / "stages")
        fmts = [f for f in FOUR_BIT if f in cfg.eval.precisions]
        results.append({"point": label, "knob": knob, "value": value, "seconds": round(time.perf_counter() - t, 1),
                        "summary": rpt._jsonable(summarize_point(run.records, fmts, cfg.eval.utility_bound)),
                        "survival": survival_means(run.survival), "records": run.records})
        atomic_write_json(out / "sweep_results.json", {"preset": preset, "seed": seed, "points": results})
    fmts = [f for f in FOUR_BIT if f in base.eval.precisions]
    family = holm_family(results, fmts)
    atomic_write_json(out / "sweep_results.json", {"preset": preset, "seed": seed, "correction": "holm",
                                                   "family_size": family, "points": results})
    wall = time.perf_counter() - t0
    md = render_sweep(results, base, preset, seed, knobs, wall, combos, family)
    atomic_write_text(out / "sweep.md", md)
    sweep_plots(results, base, out)
    print(f"qru sweep: done in {wall:.0f}s; table in {out / 'sweep.md'}", file=sys.stderr)
    return {"out": out, "points": results, "wall_seconds": wall}


def _run_point(cfg, out, seed, force, progress, device, threads, stages):
    return run_demo(cfg, out, seed=seed, force=force, progress=progress, device=device, threads=threads,
                    stages_root=stages, prune=False, overwrite=True)  # the sweep owns its point directories


def _short(st: dict) -> str:
    if st is None or st.get("effect") is None:
        return "n/a"
    return f"{st['effect']:+.1f}{'*' if st.get('shown') else ''}"


def _mean_metric(records, metric, mode, precision):
    v = [r[metric] for r in records if r["mode"] == mode and r["precision"] == precision]
    return statistics.fmean(v) if v else None


def render_sweep(results, base: DemoConfig, preset, seed, knobs, wall, combos=(), family: int | None = None) -> str:
    fmts = [f for f in FOUR_BIT if f in base.eval.precisions]
    L = [f"# qru sweep — preset `{preset}`, seed {seed}", "",
         f"One factor at a time around the `{preset}` preset; {len(results)} points, wall time {wall:.0f} s on "
         f"{platform.machine()} with {os.cpu_count()} CPU cores.",
         "Restored = KnowMem_f(4-bit) − KnowMem_f(bf16) (positive: quantization brings forgotten knowledge back); "
         "utility loss = KnowMem_r(bf16) − KnowMem_r(4-bit); forgot = share of the target − retrain KnowMem_f gap "
         "removed at bf16; utility bound = each unlearned model's relative KnowMem_r loss vs the target at bf16 "
         f"is at most {100 * base.eval.utility_bound:.0f}% (`eval.utility_bound`).", ""]
    fl = " / ".join(fmts)
    L.append(f"| Point | target gap | forgot at bf16 full / LoRA | utility bf16 full / LoRA | models within the "
             f"utility bound full / LoRA | restored full ({fl}) "
             f"| restored LoRA ({fl}) | 4-bit utility loss full ({fl}) | 4-bit utility loss LoRA ({fl}) | "
             f"LoRA − full utility at 4-bit ({fl}) | {fmts[0]} projection full / LoRA | "
             f"{fmts[0]} share of |ΔW| < step/2 full / LoRA |")
    L.append("|" + "---|" * 12)
    for r in results:
        s = r["summary"]["sanity"]
        fr = [s["modes"].get(m, {}).get("forgotten_fraction") for m in ("full", "lora")]
        ut = [_mean_metric(r["records"], "knowmem_r", m, "bf16") for m in ("full", "lora")]
        cells = [r["point"], "n/a" if s["target_gap"] is None else f"{s['target_gap']:.1f}",
                 " / ".join("n/a" if x is None else f"{100 * x:.0f}%" for x in fr),
                 " / ".join("n/a" if x is None else f"{x:.1f}" for x in ut),
                 " / ".join(f"{v['utility_models_within']}/{len(v['utility_per_model'])}"
                            if (v := s["modes"].get(m)) else "n/a" for m in ("full", "lora"))]
        fm = r["summary"]["formats"]
        cells += [" / ".join(_short(fm[f][m]["restored"]) for f in fmts) for m in ("full", "lora")]
        cells += [" / ".join(_short(fm[f][m]["utility_loss"]) for f in fmts) for m in ("full", "lora")]
        cells.append(" / ".join(_short(fm[f]["lora_minus_full_utility"]) for f in fmts))
        sv = r.get("survival") or {}
        for m in ("projection", "below_half_step_frac"):
            vals = [sv.get(mode, {}).get(fmts[0], {}).get(m) for mode in ("full", "lora")]
            cells.append(" / ".join("n/a" if x is None else f"{x:.2f}" for x in vals))
        L.append("| " + " | ".join(cells) + " |")
    fam = ("; ".join(f"{key}{'' if mode is None else f' ({mode})'}" for mode, key in FAMILY))
    L += ["", "Cells: mean over methods x unlearning seeds (KnowMem points); * = shown: the effect's p-value "
          "(two-sided Student-t test, k unlearning seeds giving k - 1 degrees of freedom for the seed noise, "
          "combined with the eval-item noise by Welch-Satterthwaite) stays below 0.05 after **Holm's step-down "
          f"correction** over the family of {family if family is not None else 'all'} comparisons (every point x "
          f"4-bit format x effect: {fam}), and |effect| >= {rpt.MIN_EFFECT:g} points. The 95% intervals, raw and "
          "Holm-adjusted p-values are in sweep_results.json."]
    L += ["", "Knobs: " + "; ".join(f"`{k}` = {', '.join(map(str, v))} ({KNOB_NOTE.get(k, '')})"
                                    for k, v in knobs.items())
          + ("; combos: " + "; ".join(", ".join(f"{k}={v}" for k, v in c.items()) for c in combos) if combos else ""),
          ""]
    L += ["## Where the effects appear (computed)", ""]
    L += regimes(results, fmts)
    qa_lines = [f"  - `{r['point']}`: " + rpt.quant_aware_answer(
        {"restore_full": r["summary"]["formats"][f]["full"]["restored"], "keep": r["summary"]["formats"][f]["qa_keep"],
         "qa_minus_full": r["summary"]["formats"][f]["qa_minus_full"]}, f)
        for r in results for f in fmts if "quant_aware" in r["summary"]["formats"][f]]
    if qa_lines:
        L += ["- **Quantization-aware unlearning** (does `--quant-aware` full FT keep at 4 bits what full FT loses? "
              "Holm-adjusted decisions):"] + qa_lines
    L += ["", "![restored](sweep_restored.png)", "", "![utility loss](sweep_utility_loss.png)", ""]
    return "\n".join(L) + "\n"


def regimes(results, fmts) -> list[str]:
    """Plain statements: at which points each effect (or its opposite) is shown, with the bf16 preconditions."""
    cats = {k: [] for k in ("z_yes", "z_no", "s_yes", "s_no", "q_full", "q_lora")}
    for r in results:
        s = r["summary"]
        sane = s["sanity"]
        full_ok = sane["target_knows"] and sane["modes"].get("full", {}).get("forgets")
        hits = {k: [] for k in cats}
        for f in fmts:
            row = s["formats"][f]
            st = row["full"]["restored"]
            if st["shown"]:
                hits["z_yes" if st["effect"] > 0 else "z_no"].append(f"{f} {st['effect']:+.1f}")
            u = row["lora_minus_full_utility"]
            if u["shown"]:
                hits["s_yes" if u["effect"] > 0 else "s_no"].append(f"{f} {u['effect']:+.1f}")
            fl, ll = row["full"]["utility_loss"], row["lora"]["utility_loss"]
            f_loss = fl["shown"] and fl["effect"] > 0
            l_loss = ll["shown"] and ll["effect"] > 0
            if f_loss and not l_loss:
                hits["q_full"].append(f"{f}: full {fl['effect']:+.1f}, LoRA {ll['effect']:+.1f}")
            if l_loss and not f_loss:
                hits["q_lora"].append(f"{f}: LoRA {ll['effect']:+.1f}, full {fl['effect']:+.1f}")
        for k, v in hits.items():
            if v:
                note = "; full FT did not forget at bf16" if k.startswith("z") and not full_ok else ""
                cats[k].append(f"`{r['point']}` ({', '.join(v)}{note})")

    def say(items):
        return "; ".join(items) + "." if items else "nowhere."

    return [
        "- **Zhang et al.** (4-bit restores knowledge that full-FT unlearning removed; KnowMem_f points): shown at "
        + say(cats["z_yes"]) + " The opposite (4-bit lowers KnowMem_f further) is shown at " + say(cats["z_no"]),
        "- **Seed paper, utility** (LoRA merged before quantization keeps more utility at 4 bits than full FT; "
        "Utility(LoRA) − Utility(full) at 4-bit): shown at " + say(cats["s_yes"])
        + " The opposite (full FT keeps more) is shown at " + say(cats["s_no"]),
        "- **Utility lost to quantization** (bf16 − 4-bit, shown for one mode only): only full FT loses at "
        + say(cats["q_full"]) + " Only LoRA loses at " + say(cats["q_lora"]),
    ]


def sweep_plots(results, base: DemoConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = [f for f in FOUR_BIT if f in base.eval.precisions]
    centre = next(r for r in results if r["knob"] is None)
    knobs = list(dict.fromkeys(r["knob"] for r in results if r["knob"] not in (None, "combo")))
    if not knobs:
        return
    for what, fname, title in (("restored", "sweep_restored.png", "knowledge restored by 4-bit (KnowMem_f points)"),
                               ("utility_loss", "sweep_utility_loss.png", "4-bit utility loss (KnowMem_r points)")):
        fig, axes = plt.subplots(1, len(knobs), figsize=(4 * len(knobs), 3.6), squeeze=False)
        for ax, knob in zip(axes[0], knobs):
            cv = _get_value(centre, knob, base)
            pts = sorted([(cv, centre)] + [(r["value"], r) for r in results if r["knob"] == knob],
                         key=lambda t: (isinstance(t[0], str), t[0]))
            xs = list(range(len(pts)))
            for f, ls in zip(fmts, ("-", "--", ":")):
                for mode, color in (("full", "C0"), ("lora", "C1")):
                    y = [p[1]["summary"]["formats"][f][mode][what]["effect"] for p in pts]
                    sts = [p[1]["summary"]["formats"][f][mode][what] for p in pts]
                    e = [st["ci"][1] - st["effect"] if st.get("ci") else 0 for st in sts]  # 95% CI half-width
                    y = [float("nan") if v is None else v for v in y]
                    ax.errorbar(xs, y, yerr=e, color=color, ls=ls, marker="o", ms=3, capsize=2,
                                label=f"{mode} {f}")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xticks(xs, [_label(p[0]) for p in pts])
            ax.set_xlabel(knob)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(title + "\nbars: 95% CI (unadjusted)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        rpt._save(fig, out / fname, dpi=100)
        plt.close(fig)


def _get_value(centre, knob, base):
    return _get(base, knob)


def summary_stats(values) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

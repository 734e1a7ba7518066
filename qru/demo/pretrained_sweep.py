"""``qru sweep --preset pretrained``: the pretrained experiment (:mod:`qru.demo.pretrained`) over a grid of
full-FT configurations: learning rate x trained parameters (linears / all) x master dtype (pure bf16 /
fp32), each evaluated at every format.

One :func:`qru.demo.pretrained.run_pretrained` run holds the whole grid (each point is one full-FT arm;
the targets, retrain models and their evaluations are shared). Per point and quantized format the sweep
reports the restoration of the forget NLL, R = (m_q(U) - m_bf16(U)) / (m_q(T) - m_bf16(U)): its mean over
seeds, the 95% Student-t interval (k - 1 degrees of freedom) and the two-sided one-sample t-test p-value
against 0. "Shown" is decided after **Holm's step-down correction** over the family of every point x
quantized format (adjusted p < 0.05), as in ``qru sweep``.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

from qru.demo import stats
from qru.demo.presets import apply_overrides, get_preset
from qru.demo.pretrained import run_pretrained
from qru.demo.pretrained_report import arms, fmt_ci
from qru.demo.stages import atomic_write_json, atomic_write_text

# the grid's defaults, each overridable with --set / --knob (comma-separated lists)
GRID = {"pretrained.methods": "ga_gdr", "pretrained.lrs_full": "1e-4,3e-4", "pretrained.train_full": "linears,all",
        "pretrained.masters_full": "bf16,fp32"}


def point_stats(values: list[float | None]) -> dict:
    """Mean, 95% t interval and the one-sample t-test p-value (mean vs 0) of per-seed values."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    out = {"mean": statistics.fmean(v) if v else None, "ci": None, "p": None, "k": len(v), "values": values}
    if len(v) >= 2:
        se = statistics.stdev(v) / math.sqrt(len(v))
        if se > 0:
            out["ci"], out["p"] = stats.t_test(out["mean"], se, len(v) - 1)
        else:
            out["ci"] = [out["mean"], out["mean"]]
    return out


def run_pretrained_sweep(out, *, seed: int = 0, knobs: dict | None = None, overrides: dict | None = None,
                         force: bool = False, progress: bool = True, threads: int | None = None,
                         base_dir: Path | None = None, stages_root: Path | None = None) -> dict:
    """Run the grid into ``out`` (``sweep_results.json``, ``sweep.md``, the run's own ``report.md``);
    ``knobs`` (``{"pretrained.lrs_full": ("1e-4", "3e-4")}``) and ``overrides`` replace :data:`GRID`'s
    values. ``base_dir`` / ``stages_root``: as :func:`run_pretrained` (tests use a tiny model)."""
    t0 = time.perf_counter()
    sets = dict(GRID)
    sets.update({k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v for k, v in (knobs or {}).items()})
    sets.update(overrides or {})
    cfg = apply_overrides(get_preset("pretrained"), sets)
    # the grid holds the fp32-master control; LoRA is not part of it
    cfg = dataclasses.replace(cfg, pretrained=dataclasses.replace(cfg.pretrained, control_methods=(),
                                                                  lora_methods=()))
    p = cfg.pretrained
    print(f"qru sweep: pretrained grid of {len(arms(p))} points x {p.seeds} seeds", file=sys.stderr, flush=True)
    res = run_pretrained(cfg, Path(out), seed=seed, force=force, progress=progress, threads=threads,
                         stages_root=stages_root, base_dir=base_dir, overwrite=True)
    fmts = [q for q in p.precisions if q != "bf16"]
    points = []
    for a in arms(p):
        e = [s["evals"] for s in res["seeds"]]
        row = {"point": a.key, "label": a.label, "lr": a.lr, "train": a.train, "master": a.master,
               "forget_acc_bf16": statistics.fmean(x[f"{a.key}|bf16"]["forget_acc"] for x in e),
               "retain_acc_bf16": statistics.fmean(x[f"{a.key}|bf16"]["retain_acc"] for x in e),
               "formats": {}}
        for q in fmts:
            r = res["restoration"][a.key][q]
            row["formats"][q] = {"nll": point_stats(r["nll"]["values"]), "acc": point_stats(r["acc"]["values"])}
        points.append(row)
    family = [pt["formats"][q]["nll"] for pt in points for q in fmts]
    for st, ph in zip(family, stats.holm([st["p"] for st in family])):
        st["p_holm"] = ph
        st["shown"] = bool(ph is not None and ph < stats.ALPHA)
    wall = time.perf_counter() - t0
    result = {"preset": "pretrained", "seed": seed, "grid": {k: sets[k] for k in GRID}, "correction": "holm",
              "family_size": sum(st["p"] is not None for st in family), "points": points,
              "seeds": [s["seed"] for s in res["seeds"]], "wall_seconds": round(wall, 1), "machine": res["machine"]}
    atomic_write_json(Path(out) / "sweep_results.json", result)
    atomic_write_text(Path(out) / "sweep.md", render(result, fmts))
    print(f"qru sweep: done in {wall:.0f}s; table in {Path(out) / 'sweep.md'}", file=sys.stderr)
    return {"out": Path(out), "points": points, "wall_seconds": wall, "results": result}


def _cell(st: dict) -> str:
    if st["mean"] is None:
        return "n/a"
    p = "" if st.get("p_holm") is None else f", p_Holm {st['p_holm']:.3f}"
    return f"{fmt_ci(st)}{p}{' *' if st.get('shown') else ''}"


def render(result: dict, fmts) -> str:
    """``sweep.md``: one row per grid point, the restoration of the forget NLL per format."""
    L = ["# qru sweep — preset `pretrained`", "",
         f"Grid: {'; '.join(f'`{k}` = {v}' for k, v in result['grid'].items())}. Seeds "
         f"{', '.join(map(str, result['seeds']))}; wall time {result['wall_seconds']:.0f} s on {result['machine']}.",
         "",
         "Cells: restoration of the forget NLL, R = (m_q(U) − m_bf16(U)) / (m_q(T) − m_bf16(U)) (1: back at the "
         "quantized target, 0: quantization changed nothing), mean over seeds [95% Student-t interval, k − 1 "
         "degrees of freedom] (k), and the two-sided one-sample t-test p-value against 0 after **Holm's "
         f"correction** over the family of {result['family_size']} comparisons (every point x quantized format); "
         "* = shown (adjusted p < 0.05). Forget / retain accuracy at bf16: means over seeds.", "",
         "| point | forget / retain acc bf16 | " + " | ".join(f"R_nll {q}" for q in fmts) + " |",
         "|---|---|" + "---|" * len(fmts)]
    for pt in result["points"]:
        L.append(f"| {pt['label']} | {pt['forget_acc_bf16']:.2f} / {pt['retain_acc_bf16']:.2f} | "
                 + " | ".join(_cell(pt["formats"][q]["nll"]) for q in fmts) + " |")
    shown = [f"{pt['label']} at {q} ({pt['formats'][q]['nll']['mean']:.2f})" for pt in result["points"] for q in fmts
             if pt["formats"][q]["nll"].get("shown")]
    L += ["", "Restoration shown after Holm's correction at: " + ("; ".join(shown) + "." if shown else "nowhere."), ""]
    return "\n".join(L)

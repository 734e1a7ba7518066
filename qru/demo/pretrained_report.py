"""The arms of the ``pretrained`` preset, restoration with Student-t intervals, the pre-registered criteria
computed from the numbers ("held" / "did not hold"), and ``report.md`` (:mod:`qru.demo.pretrained`)."""
from __future__ import annotations

import dataclasses
import math
import statistics

from qru.demo.presets import PretrainedSpec
from qru.demo.stats import t_crit

LABEL = {"ga_gdr": "GA+GDR", "npo_gdr": "NPO+GDR"}


@dataclasses.dataclass
class Arm:
    """One unlearning configuration."""
    method: str  # ga_gdr | npo_gdr
    mode: str  # full | lora
    lr: float
    master: str  # bf16 | fp32 (full); fp32 adapters (lora)
    train: str = "linears"  # full FT: "linears" (the protocol) or "all" parameters

    @property
    def key(self) -> str:
        return f"{self.method}-{self.mode}-{self.master}-lr{self.lr:g}" + ("-all" if self.train == "all" else "")

    @property
    def label(self) -> str:
        kind = {"full": "full FT, pure bf16" if self.master == "bf16" else "full FT, fp32 master",
                "lora": "LoRA, merged fp32"}[self.mode]
        return f"{LABEL[self.method]} {kind}{', all parameters' if self.train == 'all' else ''}, lr {self.lr:g}"

    @property
    def protocol(self) -> bool:
        """A configuration of the pre-registered protocol (full FT of the linears, or LoRA)."""
        return self.train == "linears"


def arms(p: PretrainedSpec) -> list[Arm]:
    """Full FT: method x lr x ``train_full`` x ``masters_full``; the fp32-master control of the linears at
    the first lr (unless already there); LoRA: method x lr."""
    full = [float(x) for x in p.lrs_full]
    out = [Arm(m, "full", lr, master, train) for m in p.methods for lr in full for train in p.train_full
           for master in p.masters_full]
    out += [a for a in (Arm(m, "full", full[0], "fp32") for m in p.control_methods)
            if a.key not in {b.key for b in out}]
    out += [Arm(m, "lora", float(lr), "fp32") for m in p.lora_methods for lr in p.lrs_lora]
    return out


def unlearned_models(p: PretrainedSpec) -> list[dict]:
    """Every evaluated unlearned model: each arm (LoRA merged in fp32), and each LoRA arm merged into the
    bf16 target as well (``merge`` "bf16"; reported beside, not part of the criteria)."""
    out = []
    for a in arms(p):
        out.append({"key": a.key, "label": a.label, "arm": a.key, "mode": a.mode, "merge": "fp32"})
        if a.mode == "lora":
            out.append({"key": f"{a.key}-mbf16", "label": a.label.replace("merged fp32", "merged bf16"),
                        "arm": a.key, "mode": a.mode, "merge": "bf16"})
    return out


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


def restorations(per_seed: list[dict], keys: list[str], precisions) -> dict:
    """``{model: {precision: {"acc": mean_ci, "nll": mean_ci}}}`` of the forget-set restoration."""
    out = {}
    for key in keys:
        out[key] = {}
        for q in precisions:
            if q == "bf16":
                continue
            r = {"acc": [], "nll": []}
            for s in per_seed:
                e = s["evals"]
                u_q, u_b, t_q = e[f"{key}|{q}"], e[f"{key}|bf16"], e[f"target|{q}"]
                r["acc"].append(restoration(u_q["forget_acc"], u_b["forget_acc"], t_q["forget_acc"]))
                r["nll"].append(restoration(u_q["forget_nll"], u_b["forget_nll"], t_q["forget_nll"]))
            out[key][q] = {k: mean_ci(v) for k, v in r.items()}
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
    """Each pre-registered criterion (``results["criteria"]``) computed from the numbers:
    ``{"id", "text", "held", "detail"}`` (``held`` None when it cannot be evaluated)."""
    per_seed, rest, crit = results["seeds"], results["restoration"], results["criteria"]
    arm_list = arms(p)
    bf16_full = [a for a in arm_list if a.mode == "full" and a.master == "bf16" and a.protocol]
    c1 = {a.key: _met_c1(per_seed, a, p) for a in bf16_full}
    met = [a for a in bf16_full if c1[a.key][0]]
    out = []
    d1 = "; ".join(f"{a.label}: {'met' if c1[a.key][0] else 'not met'} (forget acc "
                   + ", ".join(f"{r['forget_acc']:.2f}/{r['target_forget_acc']:.2f}" for r in c1[a.key][1])
                   + ", retain acc " + ", ".join(f"{r['retain_acc']:.2f}" for r in c1[a.key][1]) + ")"
                   for a in bf16_full)
    out.append({"id": "C1", "text": crit[0], "held": bool(met), "detail": d1})

    def rule2(fmt):
        if fmt not in p.precisions:
            return None, f"{fmt} not evaluated"
        if not met:
            return None, "no configuration met C1"
        res = {a.key: rest[a.key][fmt]["nll"] for a in met}
        held = all(_restores(r) for r in res.values())
        return held, "; ".join(f"{next(a.label for a in met if a.key == k)}: R_nll {fmt_ci(r)}"
                               for k, r in res.items())

    h2, d2 = rule2(p.headline)
    out.append({"id": "C2", "text": crit[1], "held": h2, "detail": d2})
    forgot = {a.key: _met_c1(per_seed, a, p)[0] for a in arm_list}
    ctrl_all = [a for a in arm_list if a.mode == "full" and a.master == "fp32" and a.protocol]
    ctrl = [a for a in ctrl_all if forgot[a.key]]
    if ctrl_all and not ctrl:
        h3, d3 = None, "not evaluable: the control did not forget at bf16 (" + "; ".join(
            f"{a.label}: forget acc " + ", ".join(f"{r['forget_acc']:.2f}" for r in _met_c1(per_seed, a, p)[1])
            for a in ctrl_all) + ")"
    elif ctrl and "nf4" in p.precisions:
        r = {a.key: rest[a.key]["nf4"]["nll"] for a in ctrl}
        h3 = all(x["mean"] is not None and x["mean"] <= 0.2 for x in r.values())
        d3 = "; ".join(f"{a.label}: R_nll at nf4 {fmt_ci(r[a.key])}" for a in ctrl)
    else:
        h3, d3 = None, "no control or nf4 not evaluated"
    out.append({"id": "C3", "text": crit[2], "held": h3, "detail": d3})
    lora_all = [a for a in arm_list if a.mode == "lora"]
    lora = [a for a in lora_all if forgot[a.key]]
    parts = [f"{a.label}: did not forget at bf16 as in C1, not evaluated (forget acc "
             + ", ".join(f"{r['forget_acc']:.2f}" for r in _met_c1(per_seed, a, p)[1]) + ", retain acc "
             + ", ".join(f"{r['retain_acc']:.2f}" for r in _met_c1(per_seed, a, p)[1]) + ")"
             for a in lora_all if not forgot[a.key]]
    h4 = bool(lora)
    for a in lora:
        for fmt in ("fp4", "nf4"):
            if fmt not in p.precisions:
                continue
            r = rest[a.key][fmt]["nll"]
            h4 = h4 and _small(r)
            ret = [s["evals"][f"{a.key}|{fmt}"]["retain_acc"] for s in per_seed]
            parts.append(f"{a.label} at {fmt}: R_nll {fmt_ci(r)}, retain acc {statistics.fmean(ret):.2f}")
    out.append({"id": "C4", "text": crit[3], "held": h4 if lora else None, "detail": "; ".join(parts)})
    parts5 = []
    for fmt in ("nf4", "int8", "int4"):
        h, d = rule2(fmt)
        parts5.append(f"{fmt}: {verdict_word(h) if h is not None else 'n/a'} ({d})")
    out.append({"id": "C5", "text": crit[4], "held": None, "detail": "reported: " + "; ".join(parts5)})
    return out


def fmt_ci(r: dict) -> str:
    if r["mean"] is None:
        return "n/a"
    ci = f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r["ci"] else " (no interval: one seed)"
    return f"{r['mean']:.2f}{ci} (k={r['k']})"


def verdict_word(held: bool | None) -> str:
    return "held" if held else "did not hold" if held is False else "reported"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


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
    t = results.get("timing", {})
    lines.append(f"Headline format: **{p['headline']}**. Seeds: {', '.join(str(s['seed']) for s in results['seeds'])}. "
                 f"Machine: {results['machine']}; wall time of this run {results['wall_seconds']:.0f} s"
                 + (f" with {t['workers']} single-thread worker processes (CPU time of the stages computed in this "
                    f"run {t.get('stage_cpu_seconds', 0):.0f} s)" if (t.get("workers") or 1) > 1 else
                    f" (process CPU time {t['cpu_seconds']:.0f} s)" if t.get("cpu_seconds") is not None else "")
                 + f"; all stages computed from scratch took {results.get('cold_seconds', 0):.0f} s, of which the "
                 f"targets and retrain models {t.get('target_retrain_seconds', 0):.0f} s (the sums of their recorded "
                 f"times). Generation: greedy, {p['max_new_tokens']} new tokens; answers the teacher-forced pass "
                 "decides are not generated (`qru.demo.pretrained_scoring`). Quantized precisions: every linear but "
                 "the head fake-quantized (dequantize(quantize(W)), block 64, int8 per row), "
                 "bf16 compute (autocast; the answers' log-probs in fp32).\n")
    if results.get("protocol_changes"):
        lines.append("Protocol changes against the issue's suggestions (made before this run, with the reason):\n")
        lines += [f"- {c}" for c in results["protocol_changes"]]
        lines.append("")
    if not results["seeds"]:
        return "\n".join(lines) + "\n"
    models = results.get("models") or results["arms"]
    lines.append("## Restoration of the forget set, mean over seeds [95% t interval]\n")
    lines.append("LoRA appears twice: merged into fp32 weights (the protocol's merge) and merged into the bf16 "
                 "target's weights (bf16 storage rounds part of the update away before quantization).\n")
    lines.append("| run | " + " | ".join(f"{q} acc | {q} NLL" for q in prec if q != "bf16") + " |")
    lines.append("|---|" + "---|---|" * (len(prec) - 1))
    for a in models:
        r = results["restoration"][a["key"]]
        lines.append(f"| {a['label']} | " + " | ".join(f"{fmt_ci(r[q]['acc'])} | {fmt_ci(r[q]['nll'])}"
                                                       for q in prec if q != "bf16") + " |")
    lines.append("\n## Accuracy (forget / retain / holdout), forget NLL and KnowMem F1, mean over seeds\n")
    lines.append("| model | " + " | ".join(prec) + " |")
    lines.append("|---|" + "---|" * len(prec))
    labels = {"target": "target", "retrain": "retrain", **{a["key"]: a["label"] for a in models}}
    for k in ["target", "retrain"] + [a["key"] for a in models]:
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
                 "ones whose quantized value equals the target's. Value flips: share of all linear weights whose "
                 "quantized value differs from the target's. Projection: Σ⟨Q(W')−Q(W), ΔW⟩/Σ‖ΔW‖². Models kept "
                 "in fp32 (the control, LoRA merged in fp32) differ from the bf16 target in nearly every weight, if "
                 "only below bf16 resolution, so their changed share is about 1 by construction.\n")
    lines.append("| run | seed | outcome | epochs | changed share | in-bin share (fp4 / nf4 / int4) | "
                 "value flips | projection |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for a in models:
        for s in results["seeds"]:
            run, dg = s["runs"][a["arm"]], s["diagnostics"][a["key"]]
            f = [x for x in ("fp4", "nf4", "int4") if x in dg]
            ch = dg[f[0]]["changed_share"] if f else None
            lines.append(f"| {a['label']} | {s['seed']} | {run['outcome']} | {run['epochs']} | "
                         + (f"{ch:.4f}" if ch is not None else "n/a") + " | "
                         + " / ".join(_num(dg[x]["in_bin_share"]) for x in f) + " | "
                         + " / ".join(_num(dg[x].get("value_flip_share")) for x in f) + " | "
                         + " / ".join(_num(dg[x].get("projection")) for x in f) + " |")
    warn = [f"seed {s['seed']} {k}: {w}" for s in results["seeds"] for k, r in s["runs"].items()
            for w in r.get("warnings") or []]
    if warn:
        lines.append("\n## Warnings\n")
        lines += [f"- {w}" for w in warn]
    return "\n".join(lines) + "\n"

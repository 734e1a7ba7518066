"""The markdown tables of the demo report: the paper-style table, one table per metric over every
precision, and the survival table."""
from __future__ import annotations

import statistics

from qru.demo.effects import matching, num
from qru.demo.presets import MUSE_KNOWMEM_TOKENS, MUSE_VERBMEM_TOKENS

METHOD_LABEL = {"ga_gdr": "GA+GDR", "ga_klr": "GA+KLR", "npo_gdr": "NPO+GDR", "npo_klr": "NPO+KLR",
                "target": "Target", "retrain": "Retrain"}
METRIC_COLS = (("verbmem_f", "VerbMem_f ↓"), ("knowmem_f", "KnowMem_f ↓"), ("privleak", "PrivLeak (→0)"),
               ("knowmem_r", "Utility (KnowMem_r) ↑"))


def _cell(records, metric, nd: int = 1, **match) -> str:
    rs = [r for r in matching(records, **match) if r.get(metric) is not None]
    if not rs:
        return "n/a"
    if len(rs) == 1:
        ci = rs[0].get(f"{metric}_ci")
        return num(rs[0][metric], nd) + (f" [{num(ci[0], nd)}, {num(ci[1], nd)}]" if ci else "")
    v = [r[metric] for r in rs]
    return f"{statistics.fmean(v):.{nd}f} ± {statistics.stdev(v):.{nd}f}"


def generation_lengths(cfg) -> str:
    """'VerbMem 128 and KnowMem 32 new tokens (MUSE's)' or the lowered lengths, named as such."""
    e = cfg.eval
    if (e.verbmem_tokens, e.knowmem_tokens) == (MUSE_VERBMEM_TOKENS, MUSE_KNOWMEM_TOKENS):
        return f"VerbMem {e.verbmem_tokens} and KnowMem {e.knowmem_tokens} new tokens (MUSE's lengths)"
    return (f"VerbMem {e.verbmem_tokens} and KnowMem {e.knowmem_tokens} new tokens (**lowered by this preset**; "
            f"MUSE uses {MUSE_VERBMEM_TOKENS} and {MUSE_KNOWMEM_TOKENS}; the VerbMem reference is cut to the same "
            f"length)")


def paper_table(records, fmt: str) -> list[str]:
    """Method x {Full, Full+LoRA, 4-bit, 4-bit+LoRA} x {VerbMem, KnowMem, PrivLeak, Utility} (markdown lines)."""
    head = "| Method | Setting | " + " | ".join(c for _, c in METRIC_COLS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRIC_COLS))]
    for mode in ("target", "retrain"):
        for p, setting in (("bf16", "Full (bf16)"), (fmt, f"4-bit ({fmt})")):
            cells = [_cell(records, m, mode=mode, precision=p) for m, _ in METRIC_COLS]
            lines.append(f"| {METHOD_LABEL[mode]} | {setting} | " + " | ".join(cells) + " |")
    methods = sorted({r["method"] for r in records if r["mode"] in ("full", "lora")},
                     key=lambda m: list(METHOD_LABEL).index(m) if m in METHOD_LABEL else 99)
    for m in methods:
        for mode, p, setting in (("full", "bf16", "Full"), ("lora", "bf16", "Full+LoRA"), ("full", fmt, "4-bit"),
                                 ("lora", fmt, "4-bit+LoRA")):
            if not matching(records, method=m, mode=mode, precision=p):
                continue
            cells = [_cell(records, k, method=m, mode=mode, precision=p) for k, _ in METRIC_COLS]
            lines.append(f"| {METHOD_LABEL.get(m, m)} | {setting} | " + " | ".join(cells) + " |")
    return lines


def precision_table(records, metric: str, precisions, nd: int = 1) -> list[str]:
    lines = ["| Model | " + " | ".join(precisions) + " |", "|" + "---|" * (1 + len(precisions))]
    groups = [("target", "target"), ("retrain", "retrain")]
    groups += sorted({(r["method"], r["mode"]) for r in records if r["mode"] in ("full", "lora")})
    for method, mode in groups:
        label = METHOD_LABEL.get(method, method) + ("" if mode in ("target", "retrain") else f" ({mode})")
        lines.append(f"| {label} | " + " | ".join(_cell(records, metric, nd, method=method, mode=mode, precision=p)
                                                 for p in precisions) + " |")
    return lines


def survival_table(survival: dict) -> list[str]:
    rows = [(k, v) for k, v in survival.items() if v.get("status") == "done" and v.get("overall")]
    if not rows:
        reasons = sorted({v.get("reason", v.get("status", "?")) for v in survival.values()})
        return [f"Survival analysis unavailable: {'; '.join(reasons) or 'no unlearned models'}."]
    cols = (("projection", "projection"), ("survival_ratio", "‖D‖/‖ΔW‖"), ("cosine", "cosine"),
            ("code_flip_frac", "codes flipped"), ("below_half_step_frac", "|ΔW| < step/2"),
            ("delta_rel_norm", "‖ΔW‖/‖W‖"))
    lines = ["| Model | Format | " + " | ".join(c for _, c in cols) + " |", "|" + "---|" * (2 + len(cols))]
    for k, v in rows:
        for fmt, o in v["overall"].items():
            cells = ["n/a" if o.get(c) is None else f"{o[c]:.3g}" for c, _ in cols]
            lines.append(f"| {k} | {fmt} | " + " | ".join(cells) + " |")
    return lines

"""Demo plots (PNG, committed atomically): the MUSE metrics by precision, and what quantization does
to each unlearned model on the forget/utility plane."""
from __future__ import annotations

import io
import math
import statistics
from pathlib import Path

from qru.demo.effects import matching, unlearned_keys
from qru.io import write_bytes


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
        for mode, style in (("target", "k-"), ("retrain", "k--"), ("full", "C0o-"), ("lora", "C1s-"),
                            ("quant_aware", "C2^-")):
            ys, es = [], []
            for p in precisions:
                v = [r[metric] for r in matching(records, mode=mode, precision=p) if r[metric] is not None]
                ys.append(statistics.fmean(v) if v else float("nan"))
                es.append(statistics.stdev(v) if len(v) > 1 else 0.0)
            if mode == "quant_aware" and all(math.isnan(y) for y in ys):
                continue
            ax.errorbar(x, ys, yerr=es, fmt=style, capsize=3, label=mode if mode in ("target", "retrain")
                        else f"unlearned ({ {'full': 'full FT', 'lora': 'LoRA'}.get(mode, 'quant-aware FT')})")
        ax.set_xticks(x, precisions)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MUSE metrics by precision (mean ± sd over unlearning methods and seeds)")
    fig.tight_layout()
    written.append(save_png(fig, out / "precision_effect.png"))
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
    written.append(save_png(fig, out / "tradeoff.png"))
    plt.close(fig)
    return written


def save_png(fig, path: Path, dpi: int = 110) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return write_bytes(path, buf.getvalue())

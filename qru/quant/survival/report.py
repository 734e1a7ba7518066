"""Survival outputs: ``survival.json``, ``survival.csv`` and two plots (committed atomically), and a
plain-text summary table."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from qru.io import check_output, staged_dir
from qru.quant.survival.stats import METRICS, OUT_METRICS, layer_index, module_type

FILES = ("survival.json", "survival.csv", "survival_heatmap.png", "survival_bars.png")


def by_format(report: Mapping) -> dict[str, dict]:
    """``{fmt: report}`` for either shape of :func:`analyze`'s result."""
    if "format" in report and "layers" in report:
        return {report["format"]: dict(report)}
    return dict(report)


def _csv_text(report: Mapping) -> str:
    buf = io.StringIO()
    reps = by_format(report)
    out = any("out_cosine" in r for rep in reps.values() for r in rep["layers"])
    cols = ["format", "block_size", "name", "layer_index", "module_type", *METRICS, *(OUT_METRICS if out else ())]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for f, rep in reps.items():
        for r in rep["layers"]:
            li = layer_index(r["name"] + ".")
            w.writerow([f, "" if rep["block_size"] is None else rep["block_size"], r["name"],
                        "" if li is None else li, module_type(r["name"]),
                        *("" if r.get(c) is None else repr(r[c]) for c in cols[5:])])
    return buf.getvalue()


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _plots(report: Mapping, heatmap: Path, bars: Path, metric: str = "survival_ratio") -> None:
    # matplotlib is heavy and only the plots need it: loaded here, with the non-interactive backend
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    reps = by_format(report)
    n = len(reps)
    types = list(dict.fromkeys(t for rep in reps.values() for t in rep["by_module_type"]))
    layers = sorted({layer_index(r["name"] + ".") for rep in reps.values() for r in rep["layers"]} - {None})
    grids = {}
    for f, rep in reps.items():
        g = np.full((max(len(layers), 1), max(len(types), 1)), np.nan)
        for r in rep["layers"]:
            li = layer_index(r["name"] + ".")
            if li is not None:
                g[layers.index(li), types.index(module_type(r["name"]))] = _num(r[metric])
        grids[f] = g
    finite = [v for g in grids.values() for v in g[np.isfinite(g)].ravel()]
    vmax = max(1.0, max(finite)) if finite else 1.0
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 0.9 * max(len(types), 1) * n, 1.5 + 0.28 * max(len(layers), 1)),
                             squeeze=False)
    for ax, (f, g) in zip(axes[0], grids.items()):
        im = ax.imshow(np.ma.masked_invalid(g), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                       interpolation="nearest")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        ax.set_xlabel("module type")
        ax.set_ylabel("layer index")
        ax.set_title(f"{metric} ({f}, block {reps[f]['block_size'] or 'per row'})", fontsize=9)
        if len(layers) <= 24:
            for (a, b), v in np.ndenumerate(g):
                if np.isfinite(v):
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.5 * vmax else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(heatmap, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.5 + 0.4 * max(len(types), 1) * n), 6.5), squeeze=False)
    width = 0.8 / n
    for ax, m in zip(axes[:, 0], ("survival_ratio", "projection")):
        for j, (f, rep) in enumerate(reps.items()):
            vals = [_num(rep["by_module_type"].get(t, {}).get(m)) for t in types]
            ax.bar([i + (j - (n - 1) / 2) * width for i in range(len(types))], vals, width, label=f)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{m} by module type (norm-weighted)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(bars, dpi=110)
    plt.close(fig)


def write_outputs(report: Mapping, out_dir: str | os.PathLike, *, overwrite: bool = False,
                  inputs: Mapping | None = None) -> dict[str, Path]:
    """Write ``survival.json``, ``survival.csv``, ``survival_heatmap.png`` (layer index × module
    type of survival_ratio, one panel per format) and ``survival_bars.png`` (survival_ratio and
    projection per module type) into ``out_dir``: staged and committed with one rename
    (:mod:`qru.io`). An existing non-empty ``out_dir`` needs ``overwrite``; ``inputs`` (role -> path)
    are refused as, inside or around ``out_dir``. Returns name → final path."""
    out_dir = check_output(out_dir, inputs or {}, overwrite=overwrite)
    with staged_dir(out_dir) as stage:
        (stage / FILES[0]).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        (stage / FILES[1]).write_text(_csv_text(report))
        _plots(report, stage / FILES[2], stage / FILES[3])
    return {f: out_dir / f for f in FILES}


def summary_table(report: Mapping) -> str:
    """A plain-text table per format: each module type and the overall aggregate."""
    lines = []
    for f, rep in by_format(report).items():
        out = "out_cosine" in rep["overall"]
        cols = ["delta_rel", "flips", "survival", "cosine", "<half", "proj"] + (["out_cos", "out_err"] if out else [])
        keys = list(METRICS) + (list(OUT_METRICS) if out else [])
        lines.append(f"\n{f} (block {rep['block_size'] or 'per row'}): {len(rep['layers'])} tensors")
        rows = [(t, a) for t, a in rep["by_module_type"].items()] + [("overall", rep["overall"])]
        width = max(9, *(len(t) for t, _ in rows))
        lines.append(" ".join([" " * width] + [c.rjust(9) for c in cols]))
        for t, a in rows:
            cells = ["—".rjust(9) if a.get(k) is None else f"{a[k]:9.4g}" for k in keys]
            lines.append(" ".join([t.ljust(width)] + cells))
    return "\n".join(lines).lstrip("\n")

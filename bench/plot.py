"""Draw PNGs from ``bench/results.csv`` (matplotlib, Agg) into ``bench/plots/``.

Rows are grouped by machine (CPU model and ISA level, the CSV's machine columns). For each
(suite, device, machine), the latest run (its timestamp) becomes one figure: a panel per
(op, unit), grouped bars per shape, one bar per provider at the median with a p20-p80 whisker,
the ratio against the peer written above each bar. A summary figure ``speedups.png`` plots every
latest ratio of a qru provider against its peer (time or throughput rows), with a line at 1.

    python bench/plot.py [--csv bench/results.csv] [--out bench/plots]
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from qru.io import write_bytes  # noqa: E402


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def machine_of(r: dict) -> str:
    """The machine a row was measured on, as ``cpu model (isa)``; ``unrecorded`` for rows without it."""
    cpu, isa = r.get("cpu_model") or "", r.get("isa") or ""
    return f"{cpu} ({isa})" if cpu or isa else "unrecorded"


def machine_slug(r: dict) -> str:
    """A file-name part for a row's machine: ISA level first, then the CPU model."""
    raw = f"{r.get('isa') or 'unrecorded'}-{r.get('cpu_model') or ''}"
    return "_".join("".join(c if c.isalnum() else " " for c in raw).split())[:48]


def latest_runs(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(suite, device, machine) -> the rows of its most recent run there (largest timestamp)."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["suite"], r["device"], machine_of(r))].append(r)
    out = {}
    for key, rs in groups.items():
        ts = max(r["timestamp"] for r in rs)
        out[key] = [r for r in rs if r["timestamp"] == ts]
    return out


def save(fig, path: Path) -> None:
    """Write the figure to ``path`` as PNG, atomically (qru.io)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight", format="png")
    write_bytes(path, buf.getvalue())
    plt.close(fig)


def suite_figure(suite: str, device: str, machine: str, rows: list[dict], out: Path) -> Path:
    panels: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        panels[(r["op"], r["unit"])].append(r)
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(10, 3.4 * n), squeeze=False)
    fig.subplots_adjust(hspace=0.55)
    for ax, ((op, unit), rs) in zip(axes[:, 0], sorted(panels.items())):
        shapes = list(dict.fromkeys(r["shape"] for r in rs))
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        width = 0.8 / max(1, len(provs))
        for j, prov in enumerate(provs):
            xs, ys, lo, hi, ratios = [], [], [], [], []
            for i, sh in enumerate(shapes):
                r = next((r for r in rs if r["shape"] == sh and r["provider"] == prov), None)
                if r is None:
                    continue
                m, p20, p80 = float(r["median"]), float(r["p20"]), float(r["p80"])
                xs.append(i + (j - (len(provs) - 1) / 2) * width)
                ys.append(m)
                lo.append(max(0.0, m - p20))
                hi.append(max(0.0, p80 - m))
                ratios.append(r["ratio_vs_peer"])
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=prov)
            for b, ratio in zip(bars, ratios):
                if ratio:
                    ax.annotate(f"{float(ratio):.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=7, rotation=10)
        ax.set_ylabel(unit)
        ax.set_title(op, fontsize=9)
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"{suite} ({device}) - {machine}\n{r0['timestamp']} @ {r0['git_sha']}", fontsize=10)
    path = out / f"{suite}_{device}_{machine_slug(r0)}.png"
    save(fig, path)
    return path


def speedup_figure(runs: dict, out: Path) -> Path | None:
    pts = []
    for (suite, device, machine), rows in sorted(runs.items()):
        for r in rows:
            # peer ratios of qru's providers; GB/s rows carry a fraction of the copy roofline instead
            if (r["ratio_vs_peer"] and r["provider"].startswith("qru") and r["unit"] not in ("MiB", "GB/s")
                    and r["provider"] != "qru-reference"):
                pts.append((f"{r.get('isa') or '?'} {suite}/{device}: {r['op']} [{r['provider']}] {r['shape']}"[:90],
                            float(r["ratio_vs_peer"])))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(pts) + 1.2))
    ax.barh(range(len(pts)), [p[1] for p in pts], color=["tab:green" if p[1] >= 1 else "tab:red" for p in pts])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(pts)))
    ax.set_yticklabels([p[0] for p in pts], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("qru speed-up vs peer (same run)")
    path = out / "speedups.png"
    save(fig, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=HERE / "results.csv")
    ap.add_argument("--out", type=Path, default=HERE / "plots")
    args = ap.parse_args(argv)
    if not args.csv.exists():
        print(f"plot: {args.csv} not found; run a benchmark first", file=sys.stderr)
        return 1
    rows = read(args.csv)
    if not rows:
        print(f"plot: {args.csv} has no rows", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    runs = latest_runs(rows)
    for (suite, device, machine), rs in sorted(runs.items()):
        print(f"plot: {suite_figure(suite, device, machine, rs, args.out)}")
    sp = speedup_figure(runs, args.out)
    if sp:
        print(f"plot: {sp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

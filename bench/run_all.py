"""``make bench``: every CPU suite in its quick mode, one after another as child processes, then
the plot script. Each suite prints its own table (machine on top) and appends to
``bench/results.csv``; this script prints how long each took and a final summary of the lines
that carry a same-run ratio against a peer.

Budget: about 10 minutes on a 2-core machine. Each suite has a time limit; one that exceeds it is
stopped (what it printed is kept; a suite appends its CSV rows at its end) and reported.
Threads: 2 for the kernel suites that time big single ops (LoRA linear, quantize), 1 for the
step, generation, eval and decode suites: on a shared 2-core machine a second OpenMP thread that
is descheduled stalls every parallel region (~15 ms each), which dominates runs of many ops.

    python bench/run_all.py [--suites step generate ...] [--full] [--no-plot]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (script, quick args, full args, time limit in seconds for the quick run)
SUITES = {
    "quant": ("bench_quant.py", ["--quick", "--formats", "nf4", "int8", "--threads", "2"], [], 90),
    "quant-busy": ("bench_quant.py", ["--quick", "--formats", "nf4", "--threads", "2", "--busy", "1"],
                   ["--formats", "nf4", "--threads", "2", "--busy", "1"], 60),
    "lora": ("bench_lora.py", ["--quick", "--dropout", "0", "--threads", "2"], [], 90),
    "qlinear": ("bench_qlinear.py", ["--quick", "--formats", "nf4", "--threads", "1"], [], 60),
    "step": ("bench_step.py", ["--quick", "--threads", "1"], ["--threads", "1"], 260),
    "generate": ("bench_generate.py", ["--quick", "--threads", "1"], ["--threads", "1"], 160),
    "attention": ("bench_attention.py", ["--quick", "--threads", "1"], ["--threads", "1"], 60),
    "eval": ("bench_eval.py", ["--n", "16", "--repeats", "2", "--threads", "1"], [], 120),
    "eval-medium": ("bench_eval.py", ["--model", "medium", "--n", "16", "--repeats", "1", "--threads", "1"],
                    ["--model", "medium"], 300),
    "distributed": ("bench_distributed.py", ["--steps", "4"], [], 120),
}
SUMMARY_PREFIXES = ("unlearn_step ", "generate ")


def run_suite(name: str, full: bool, scale: float) -> tuple[float, int, list[str]]:
    script, quick, full_args, limit = SUITES[name]
    cmd = [sys.executable, "-u", str(HERE / script), *(full_args if full else quick)]
    print(f"\n==== {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    keep = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as p:
        try:
            deadline = None if full else t0 + limit * scale
            for line in p.stdout:
                sys.stdout.write(line)
                if "|" not in line and (line.startswith(SUMMARY_PREFIXES) or "target >=" in line):
                    keep.append(line.rstrip())
                if deadline is not None and time.perf_counter() > deadline:
                    p.kill()
                    print(f"==== {name}: stopped after its {limit * scale:.0f} s limit", flush=True)
                    break
            rc = p.wait()
        except KeyboardInterrupt:
            p.kill()
            raise
    return time.perf_counter() - t0, rc, keep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    ap.add_argument("--full", action="store_true", help="full sizes, no time limits (much longer than 10 minutes)")
    ap.add_argument("--limit-scale", type=float, default=1.0, help="multiply every suite's time limit")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = {}
    for name in args.suites:
        results[name] = run_suite(name, args.full, args.limit_scale)
    print("\n==== summary")
    failed = 0
    for name, (secs, rc, keep) in results.items():
        status = "ok" if rc == 0 else f"exit {rc}"
        failed += rc != 0
        print(f"  {name:<9} {secs:6.1f} s  {status}")
        for line in keep:
            print(f"    {line.strip()}")
    print(f"  total {time.perf_counter() - t0:.0f} s")
    if not args.no_plot:
        subprocess.run([sys.executable, str(HERE / "plot.py")], cwd=ROOT, check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""qru's C++ kernels on OpenMP against the same kernels on ``qru::Team``, same run, paired.

The OpenMP side is an earlier revision of qru (``--base-rev``, default the last one before the port),
exported with ``git archive`` into a temporary directory; each side runs in a worker process of its
own (its own ``TORCH_EXTENSIONS_DIR``, so each builds its own kernels) at ``--threads`` threads, and
the parent asks the two in turn (ABBA) to time the same calls on the same inputs, so load on a busy
machine hits both alike. Rows: suite ``team``, providers ``openmp`` (the base revision) and ``team``
(this checkout), ratio = median over turns of openmp time / team time. State the machine's load
(``uptime``) with any number taken from here: it is not a column.

    python bench/bench_team.py [--threads 2] [--turns 9] [--base-rev REV]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_REV = "81604b4"  # main before the kernels other than the quantizers left OpenMP


# ----------------------------------------------------------------------------------------- worker
def _cases(torch, load):
    """name -> (shape label, dtype label, work: a callable running the raw C++ op once)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ll, at, ts, lo = load("llama_ops"), load("attention"), load("token_stats"), load("lora")
    lp, bl, qm = load("linear_logprobs"), load("bf16_linear"), load("qmatmul")
    c = {}
    x, w, dy = r(1024, 512), r(512), r(1024, 512)
    _, rstd = ll.rmsnorm_fwd(x, w, 1e-6)
    c["rmsnorm_fwd"] = ("1024x512", "fp32", lambda: ll.rmsnorm_fwd(x, w, 1e-6))
    c["rmsnorm_bwd"] = ("1024x512", "fp32", lambda: ll.rmsnorm_bwd(dy, x, w, rstd))
    gt, up, gd = r(1024, 1376), r(1024, 1376), r(1024, 1376)
    c["swiglu_fwd"] = ("1024x1376", "fp32", lambda: ll.swiglu_fwd(gt, up))
    c["swiglu_bwd"] = ("1024x1376", "fp32", lambda: ll.swiglu_bwd(gd, gt, up))
    q, cs, sn = r(4, 256, 8, 64), r(4, 256, 64), r(4, 256, 64)
    c["rope_fwd"] = ("B4 T256 H8 D64", "fp32", lambda: ll.rope_fwd(q, cs, sn, torch.float32))
    qa, ka, va = r(4, 8, 256, 64), r(4, 8, 256, 64), r(4, 8, 256, 64)
    c["causal_attn"] = ("B4 H8 T256 D64", "fp32", lambda: at.causal_attn(qa, ka, va, 0.125))
    qd, kd, vd = r(8, 8, 1, 64).bfloat16(), r(8, 8, 512, 64).bfloat16(), r(8, 8, 512, 64).bfloat16()
    c["decode_attn"] = ("B8 H8 S512 D64", "bf16", lambda: ll.decode_attn(qd, kd, vd, None, 0.125))
    z, y = r(256, 32000), torch.randint(0, 32000, (256,), generator=g)
    c["token_stats"] = ("256x32000", "fp32", lambda: ts.token_stats(z, y))
    c["lse_gather+dlogits"] = ("256x32000", "fp32", lambda: lp.lse_gather(z.clone(), y, -100, True))
    xl, A, gu = r(1024, 512), r(16, 512), r(1024, 16)
    c["lora_rowdot"] = ("M1024 512 r16 p0.05", "fp32", lambda: lo.rowdot(xl, A, 1.05, None, 7, 3277))
    c["lora_expand"] = ("M1024 512 r16 p0.05", "fp32", lambda: lo.expand(gu, A, 1.05, None, None, 7, 3277))
    c["lora_tallreduce"] = ("M1024 512 r16 p0.05", "fp32", lambda: lo.tallreduce(gu, xl, 1.05, None, 7, 3277))
    xb, wb = r(4, 512).bfloat16(), r(32000, 512).bfloat16()
    c["bf16_linear"] = ("M4 512->32000", "bf16", lambda: bl.skinny_linear(xb, wb))
    wq = torch.randint(0, 256, (4096 * 1024 // 2,), dtype=torch.uint8, generator=g)
    am, code = r(4096 * 1024 // 64).abs(), r(16)
    xq = r(4, 1024).bfloat16()
    e8, ef = torch.empty(0, dtype=torch.uint8), torch.empty(0)
    c["qmatmul_nf4"] = ("M4 1024->4096", "bf16",
                        lambda: qm.quant_linear_small(xq, wq, am, e8, code, ef, 0, 4096, 64, False))
    return c


def worker(tree: str, threads: int) -> None:
    """Serve 'name calls' lines on stdin with the seconds those calls took, one JSON line each."""
    sys.path.insert(0, tree)
    import torch

    from qru.kernels._backend import load_cpp_ext

    torch.set_num_threads(threads)
    cases = _cases(torch, load_cpp_ext)
    for _, _, fn in cases.values():  # build and warm
        fn()
    print(json.dumps({k: v[:2] for k, v in cases.items()}), flush=True)
    for line in sys.stdin:
        name, calls = line.split()
        fn = cases[name][2]
        t0 = time.perf_counter()
        for _ in range(int(calls)):
            fn()
        print(json.dumps(time.perf_counter() - t0), flush=True)


# ----------------------------------------------------------------------------------------- parent
class Side:
    def __init__(self, tree: Path, threads: int, ext_dir: str):
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=ext_dir, OMP_NUM_THREADS=str(threads))
        env.pop("QRU_BACKEND", None)
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(tree),
                                   "--threads", str(threads)], cwd=tree, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.cases = json.loads(self.p.stdout.readline())

    def time(self, name: str, calls: int) -> float:
        self.p.stdin.write(f"{name} {calls}\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline()) / calls

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=9, help="paired turns per kernel (ABBA)")
    ap.add_argument("--base-rev", default=BASE_REV, help="the revision whose kernels are on OpenMP")
    ap.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.threads)
        return 0
    if args.threads < 1 or args.turns < 1:
        ap.error("--threads and --turns must be >= 1")
    sys.path.insert(0, str(ROOT))
    from bench.harness import Row, Timing, report
    import torch

    torch.set_num_threads(args.threads)  # the rows' thread column

    with tempfile.TemporaryDirectory(prefix="qru-omp-") as tmp:
        base = Path(tmp) / "tree"
        base.mkdir()
        arch = subprocess.run(["git", "archive", args.base_rev], cwd=ROOT, capture_output=True, check=False)
        if arch.returncode:
            raise SystemExit(f"--base-rev {args.base_rev!r}: git archive failed: {arch.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(base)], input=arch.stdout, check=True)
        ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path(tmp) / "ext")
        print(f"load: {os.getloadavg()}; building both sides' kernels...", flush=True)
        sides = {"openmp": Side(base, args.threads, ext + "-openmp"), "team": Side(ROOT, args.threads, ext)}
        rows = []
        try:
            for name, (shape, dtype) in sides["team"].cases.items():
                one = sides["team"].time(name, 1)
                calls = max(1, int(0.05 / max(one, 1e-6)))  # ~50 ms per sample
                times = {k: [] for k in sides}
                for i in range(args.turns):
                    for k in (("openmp", "team") if i % 2 == 0 else ("team", "openmp")):
                        times[k].append(sides[k].time(name, calls))
                ratio = statistics.median(a / b for a, b in zip(times["openmp"], times["team"]))
                for k, v in times.items():
                    q = sorted(v)
                    t = Timing(statistics.median(v), q[len(q) // 5], q[(4 * len(q)) // 5], v)
                    rows.append(Row.of("team", name, k if k == "team" else f"openmp@{args.base_rev}", shape,
                                       dtype, "cpu", t, ratio=ratio if k == "team" else 1.0))
                print(f"{name}: openmp {statistics.median(times['openmp']) * 1e3:.3f} ms, "
                      f"team {statistics.median(times['team']) * 1e3:.3f} ms, {ratio:.2f}x", flush=True)
        finally:
            for s in sides.values():
                s.close()
        print(f"load: {os.getloadavg()}")
        report(f"C++ kernels, OpenMP ({args.base_rev}) vs qru::Team, {args.threads} threads", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

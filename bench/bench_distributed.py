"""Data-parallel training on FSDP2 (``qru.train.distributed``): world size 1 vs 2 over gloo on CPU.

Each world size is a ``torchrun --standalone --nproc-per-node W`` launch of this file's worker:
qru's Llama (``--config``, default ``small``), every decoder layer ``fully_shard``ed, one global
batch of ``--batch`` rows x ``--seq`` tokens split over the ranks (``rank_batch``: each rank its
chunk, loss weighted by its token share), forward + backward (gradients reduce-scattered), the
sharded norm clip and fused AdamW, as ``qru.train.loop.train_loop`` runs a pre-training step. The
same global batch at every world size, so a ratio is a speed-up at equal work.

Reported (rank 0, fp32, one OpenMP thread per rank):

* ``train step``: global tokens per second (median of ``--steps`` timed steps after 2 warm-up
  steps, each between barriers); ``vs peer`` = this world size's median over world size 1's.
* ``collective share``: the share of a step's wall time during which the gloo worker thread runs a
  collective (all-gather, reduce-scatter, all-reduce: the union of the profiler's ``gloo:*``
  intervals on rank 0), over 3 profiled steps after the timed ones. It includes time a rank waits
  for the other in a collective.

On this 2-core machine, shared with other jobs, world size 2 has both cores and world size 1 one.
GPU rows (NCCL, world 1 and min(2, GPUs)) only when CUDA is present.

    python bench/bench_distributed.py [--steps N] [--seq T] [--batch B] [--config small]
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import Row, Timing, _quantile, report  # noqa: E402
from qru.model.config import LlamaConfig  # noqa: E402
from qru.model.llama import Llama  # noqa: E402
from qru.train import distributed as D  # noqa: E402
from qru.train import losses as L  # noqa: E402
from qru.train.data import TokenizedSet  # noqa: E402
from qru.train.loop import check_finite_grads, make_optimizer, model_sequence_logprobs  # noqa: E402


def _union(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def worker(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    with D.session(device) as d:
        torch.manual_seed(0)
        cfg = LlamaConfig.preset(args.config)
        model = D.load_sharded_pretrained(d, lambda: Llama(cfg), lambda: Llama(cfg), lambda m: None, "fp32", "fp32")
        opt = make_optimizer([p for p in model.parameters()], 1e-4, 0.0)
        names = {id(p): n for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(1)
        rows = [(torch.randint(0, cfg.vocab_size, (args.seq,), generator=g).tolist(), [0] + [1] * (args.seq - 1))
                for _ in range(args.batch)]
        ts = TokenizedSet.from_examples(rows)
        batch = D.rank_batch(d, ts, range(args.batch), 0).to(d.device)
        params = [p for p in model.parameters()]

        def step():
            loss = L.mean_nll(*model_sequence_logprobs(model, batch.input_ids, batch.loss_mask)) * batch.token_share
            loss.backward()
            check_finite_grads(names, params, 1.0, 1, d)
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = []
        for i in range(2 + args.steps):
            D.barrier(d)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            D.barrier(d)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        shares = []
        for _ in range(3):
            D.barrier(d)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter_ns()
                step()
                D.barrier(d)
                t1 = time.perf_counter_ns()
            ev = prof.profiler.kineto_results.events()
            spans = [(e.start_ns(), e.end_ns()) for e in ev if e.name().startswith(("gloo:", "nccl:"))]
            wall = max(t1 - t0, 1)
            prof_wall = max((e.end_ns() for e in ev), default=0) - min((e.start_ns() for e in ev), default=0)
            shares.append(100.0 * _union(spans) / max(prof_wall, wall, 1))
        if d.is_main:
            Path(args.out).write_text(json.dumps({"times": times, "shares": shares, "world": d.world,
                                                  "backend": d.backend}))


def launch(world: int, args, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        for k in D.ENV_VARS:
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(Path(__file__).resolve()), "--worker", "--out", str(out), "--device", device,
               "--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch), "--config", args.config]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"world size {world} failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--config", default="small")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    tokens = args.batch * args.seq
    shape = f"{args.config} B{args.batch}xT{args.seq}"
    setups = [("cpu", 1), ("cpu", 2)]
    if torch.cuda.is_available():
        setups += [("cuda", 1), ("cuda", min(2, torch.cuda.device_count()))]
    rows, base = [], {}
    for device, world in setups:
        res = launch(world, args, device)
        t = res["times"]
        timing = Timing(statistics.median(t), _quantile(t, 0.2), _quantile(t, 0.8), t)
        base.setdefault(device, timing.median)
        provider = f"{res['backend']} world {world}"
        rows.append(Row.of("distributed", "train step (fsdp2)", provider, shape, "fp32", device, timing,
                           unit="tok/s", scale=lambda x: tokens / x, ratio=base[device] / timing.median))
        s = res["shares"]
        rows.append(Row("distributed", "collective share", provider, shape, "fp32", device, statistics.median(s),
                        min(s), max(s), "%"))
    report("FSDP2 data parallel: world size 1 vs 2", rows)


if __name__ == "__main__":
    main()

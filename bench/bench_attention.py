"""Prefill / scoring kernels on CPU against torch, in the same run (ABBA-paired per call):

* ``causal_attention``: qru's C++ flash attention (``csrc/attention.cpp``) vs
  ``F.scaled_dot_product_attention(is_causal=True)``, fp32, no autograd;
* ``token_stats``: qru's fused log-prob / mean / variance row kernel (``csrc/token_stats.cpp``)
  vs the torch ops it replaced in scoring (``log_softmax``, ``exp``, products and sums).

"vs peer" is the median of per-turn ratios torch time / qru time (> 1: qru faster).

    .venv/bin/python bench/bench_attention.py [--quick] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Row, paired, report  # noqa: E402
from qru.kernels.causal_attention import causal_attention  # noqa: E402
from qru.kernels.token_stats import token_stats  # noqa: E402


def torch_token_stats(z, y):
    """The scoring code's previous torch path: four (T, V) temporaries."""
    lsm = torch.log_softmax(z.float(), dim=-1)
    lp = lsm.gather(-1, y[:, None]).squeeze(-1)
    p = lsm.exp()
    mu = (p * lsm).sum(-1)
    return lp, mu, ((p * lsm * lsm).sum(-1) - mu * mu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and turns")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    samples = 5 if args.quick else 11
    rows = []
    shapes = [(4, 8, 4, 512, 32), (1, 32, 32, 512, 128)] + ([] if args.quick else [(2, 8, 4, 896, 32)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for B, H, KV, T, D in shapes:
            q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # as the model makes it
            k, v = torch.randn(B, KV, T, D, generator=g), torch.randn(B, KV, T, D, generator=g)
            fns = {"torch-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                        enable_gqa=H != KV),
                   "qru": lambda: causal_attention(q, k, v)}
            times, ratios = paired(fns, samples)
            shape = f"B{B} H{H} KV{KV} T{T} D{D}"
            for p in fns:
                rows.append(Row.of("attention", "causal_attention", p, shape, "fp32", "cpu", times[p], unit="ms",
                                   scale=lambda s: s * 1e3, ratio=ratios[p] if p == "qru" else None))
        for N, V in [(512, 2048), (256, 32000)]:
            z = torch.randn(N, V, generator=g) * 3
            y = torch.randint(0, V, (N,), generator=g)
            fns = {"torch-ops": lambda: torch_token_stats(z, y), "qru": lambda: token_stats(z, y)}
            times, ratios = paired(fns, samples)
            for p in fns:
                rows.append(Row.of("attention", "token_stats", p, f"N{N} V{V}", "fp32", "cpu", times[p], unit="ms",
                                   scale=lambda s: s * 1e3, ratio=ratios[p] if p == "qru" else None))
    report("prefill / scoring kernels vs torch (CPU)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

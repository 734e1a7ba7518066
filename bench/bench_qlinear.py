"""QuantLinear decode throughput (CPU): fused dequant-GEMV vs dequantize + F.linear vs dense.

For a few activation rows (decode, M = 1..8) and a Llama-7B-sized weight, times per call:

* ``fused``: qru C++ ``quant_linear_small`` (codes indexed into per-block tables, the weight is
  never materialized);
* ``dequant+linear``: qru C++ dequantize to the compute dtype, then ``F.linear``;
* ``dense``: ``F.linear`` on a dense weight in the compute dtype (bf16: 2 bytes / weight);
* ``bnb`` (nf4 only, when bitsandbytes is installed): ``bitsandbytes.nn.Linear4bit`` forward.

Providers are called one at a time, in turn (outside load hits all alike); "vs peer" is the
median of paired per-turn ratios dense time / provider time (> 1: faster than dense bf16).
Rows report GB/s of weight bytes read (packed bytes for the quantized providers).

    python bench/bench_qlinear.py [--quick] [--formats nf4 int4 int8] [--rows 1 2 4 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Row, Timing, bench, report  # noqa: E402
from qru.kernels import qmatmul  # noqa: E402
from qru.kernels._backend import load_cpp_ext  # noqa: E402
import qru.quant as Q  # noqa: E402

SUITE = "qlinear"


def paired(fns: dict, samples: int) -> tuple[dict[str, Timing], dict[str, float]]:
    """Time ``fns`` one call each per turn; ratios vs the first provider (median over turns)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            times[name].append(bench(fn, warmup=0, repeats=1).median)
    peer = next(iter(fns))
    out, ratios = {}, {}
    for k, s in times.items():
        srt = sorted(s)
        out[k] = Timing(statistics.median(s), srt[int(0.2 * (len(s) - 1))], srt[int(0.8 * (len(s) - 1))], s)
        ratios[k] = statistics.median(a / b for a, b in zip(times[peer], s))
    return out, ratios


def packed_bytes(q) -> int:
    return q.data.numel() + 4 * q.scales.numel() + (q.zeros.numel() if q.zeros is not None else 0)


def run(fmt: str, shape: tuple[int, int], rows: list[int], dtype: torch.dtype, samples: int) -> list[Row]:
    n, k = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.02
    bs = None if fmt == "int8" else (64 if fmt in ("nf4", "fp4") else 128)
    q = Q.quantize(w, fmt, bs)
    data, scales, zeros = q.data, (q.absmax() if fmt in ("nf4", "fp4") else q.scales), q.zeros
    dense = w.to(dtype)
    bnb_lin = None
    if fmt in ("nf4", "fp4"):
        try:
            import bitsandbytes as bnb

            bnb_lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type=fmt)
            bnb_lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type=fmt)._quantize("cpu")
            bnb_lin.eval()
        except Exception as e:  # noqa: BLE001 - the peer is optional
            print(f"bitsandbytes peer unavailable: {e}")
            bnb_lin = None
    qbytes, dbytes = packed_bytes(q), n * k * dense.element_size()
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=g).to(dtype)
        fns = {
            "dense": lambda: F.linear(x, dense),
            "fused": lambda: qmatmul._quant_linear_cpp_fused(x, data, scales, zeros, fmt, bs, n, None),
            "dequant+linear": lambda: F.linear(x, qmatmul.dequantize_weight(data, scales, zeros, fmt, bs, n, k, dtype)),
        }
        if bnb_lin is not None:
            fns["bnb"] = lambda: bnb_lin(x)
        with torch.no_grad():
            t, r = paired(fns, samples)
        label = f"{n}x{k} M={m}"
        for name in fns:
            nbytes = dbytes if name == "dense" else qbytes
            out.append(Row.of(SUITE, f"{fmt} decode", name, label, str(dtype).removeprefix("torch."), "cpu", t[name],
                              unit="GB/s", scale=lambda s, b=nbytes: b / s / 1e9, ratio=r[name]))
            print(f"  {fmt} {label} {name:15s} {t[name].median * 1e3:8.3f} ms  {r[name]:.2f}x dense", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller weight, fewer samples")
    ap.add_argument("--formats", nargs="+", default=["nf4", "int4", "int8"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if load_cpp_ext("qmatmul") is None:
        sys.exit("the qmatmul C++ extension cannot be built here")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shape = (1024, 1024) if args.quick else (4096, 4096)
    samples = args.samples or (10 if args.quick else 30)
    rows = []
    for fmt in args.formats:
        rows += run(fmt, shape, args.rows, dtype, samples)
    report(f"qlinear decode CPU, {args.threads} thread(s) (GB/s of weight bytes read; vs peer = dense "
           f"{args.dtype} F.linear time / this time)", rows)


if __name__ == "__main__":
    main()

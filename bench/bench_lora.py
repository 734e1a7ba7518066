"""LoRA linear forward+backward: qru's fused op against peft's LoRA Linear (same run, same inputs).

CPU: qru (the default CPU backend: C++ thin products, base GEMMs through ``qru.kernels.dense``:
oneDNN) vs peft (torch's GEMMs: MKL), fp32,
tokens 2048, in/out 4096→4096 and 4096→11008, r 16/32/64, with and without dropout, forward
alone (training mode, graph recorded) and forward+backward. The providers alternate call by
call and the speed-up is the median of the paired ratios, so outside load hits all alike. A
``floor`` row times the frozen-base GEMMs alone with torch (``x Wᵀ``; and ``dY W`` for fwd+bwd):
the floor of any LoRA built on torch's fp32 GEMMs, as peft is; a ``dense floor`` row times the same
two GEMMs through ``qru.kernels.dense``, the floor under qru's own layer. A ``rank-r products`` row
times the six thin products of a fwd+bwd (``x Aᵀ``, ``u Bᵀ``, ``dY B``, ``g A``, ``gᵀ x``, ``dYᵀ u``)
with torch at the current thread count (``torch``, what peft runs) and on one thread (``one thread``,
what qru's layer runs them with, :func:`qru.kernels.lora.one_thread`). GPU (skipped without CUDA): qru's Triton kernels
vs the unfused torch composition and peft, bf16, in TFLOP/s.

    python bench/bench_lora.py [--quick] [--dropout 0 0.05] [--samples N] [--threads N] [--clock wall|thread]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Row, Timing, add_allocator_arg, bench, report, run_under_allocators  # noqa: E402
from qru.kernels.lora import lora_linear_reference, one_thread  # noqa: E402
from qru.model.lora_linear import LoRALinear  # noqa: E402

SUITE = "lora"


def peft_layer(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float):
    n_out, n_in = W.shape
    holder = nn.Module()
    holder.proj = nn.Linear(n_in, n_out, bias=False, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        holder.proj.weight.copy_(W)
    return wrap_peft(holder, A, B, alpha, dropout)


def wrap_peft(holder: nn.Module, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float):
    """peft's LoRA layer around ``holder.proj`` (any base: dense or bitsandbytes 4-bit), with the given
    factors, in train mode."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(holder, LoraConfig(r=A.shape[0], lora_alpha=alpha, lora_dropout=dropout,
                                           target_modules=["proj"]))
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer.train()


def qru_layer(W, A, B, alpha, dropout):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    return LoRALinear.from_linear(lin, A.shape[0], alpha, dropout=dropout, init=(A, B)).train()


def step(layer, x, gy):
    def run():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(gy)
    return run


def forward(layer, x):
    def run():
        layer(x)  # training-mode forward that records the graph; freed at once
    return run


def base_fwd(x, W):
    """The forward floor: the frozen-base GEMM ``x Wᵀ`` alone."""
    xd = x.detach()
    return lambda: torch.mm(xd, W.t())


def base_gemms(x, W, gy):
    """The floor any LoRA fwd+bwd pays: the two frozen-base GEMMs (y = x Wᵀ, dX = dY W), nothing else."""
    xd = x.detach()

    def run():
        torch.mm(xd, W.t())
        torch.mm(gy, W)
    return run


def dense_gemms(x, W, gy, backward: bool):
    """The same frozen-base GEMMs through qru.kernels.dense (what qru's layer runs them with)."""
    from qru.kernels.dense import dense_linear

    xd = x.detach()

    def run():
        dense_linear(xd, W)
        if backward:
            dense_linear(gy, W.t())
    return run


def thin_products(x, A, B, gy, one: bool):
    """The six rank-r GEMMs of a LoRA fwd+bwd, with torch; ``one``: under :func:`one_thread`."""
    xd, Ad, Bd = x.detach(), A.detach(), B.detach()
    u, g = xd @ Ad.t(), gy @ Bd

    def six():
        torch.mm(xd, Ad.t())
        torch.mm(u, Bd.t())
        torch.mm(gy, Bd)
        torch.mm(g, Ad)
        torch.mm(g.t(), xd)
        torch.mm(gy.t(), u)

    def run():
        if one:
            with one_thread():
                six()
        else:
            six()
    return run


def flops(M, n_in, n_out, r):
    """Forward + backward (no dW): 2 big GEMMs and 6 thin ones."""
    return 4 * M * n_in * n_out + 6 * M * r * (n_in + n_out)


# "wall": the harness's wall clock. "thread": CPU time of the calling thread (time.thread_time),
# blind to time spent descheduled on shared cores; only meaningful with one torch thread.
CLOCK = "wall"


def _once(fn, device: str) -> float:
    if CLOCK == "thread":
        t0 = time.thread_time()
        fn()
        return time.thread_time() - t0
    return bench(fn, warmup=0, repeats=1, device=device).median


def interleaved(fns: dict, samples: int, device: str) -> tuple[dict[str, Timing], dict[str, float]]:
    """Time the providers one call at a time, in turn, so a burst of outside load hits all of
    them alike. Returns per-provider timings and, per provider, the median over turns of
    (first provider's time / this provider's time)."""
    for fn in fns.values():
        bench(fn, warmup=1, repeats=1, device=device)
    times = {k: [] for k in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            times[name].append(_once(fn, device))
    peer = next(iter(fns))
    out, ratios = {}, {}
    for k, s in times.items():
        srt = sorted(s)
        out[k] = Timing(statistics.median(s), srt[int(0.2 * (len(s) - 1))], srt[int(0.8 * (len(s) - 1))], s)
        ratios[k] = statistics.median(a / b for a, b in zip(times[peer], s))
    return out, ratios


def make_inputs(M, n_in, n_out, r, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(device, dtype)
    A = (torch.randn(r, n_in, generator=g) / n_in ** 0.5).to(device)
    B = (torch.randn(n_out, r, generator=g) * 0.01).to(device)
    x = torch.randn(M, n_in, generator=g).to(device, dtype).requires_grad_()
    gy = torch.randn(M, n_out, generator=g).to(device, dtype)
    return W, A, B, x, gy


def cpu_section(shapes, ranks, dropouts, tokens, samples):
    rows = []
    dtype = torch.float32
    for n_in, n_out in shapes:
        for r in ranks:
            W, A, B, x, gy = make_inputs(tokens, n_in, n_out, r, dtype, "cpu")
            for p in dropouts:
                alpha = 2.0 * r
                q = qru_layer(W, A, B, alpha, p)
                pf = peft_layer(W, A, B, alpha, p)
                shape = f"M{tokens} {n_in}->{n_out} r{r} p{p:g}"
                groups = (("fwd", "x@W^T only", {"peft": forward(pf, x), "qru": forward(q, x),
                                                 "floor": base_fwd(x, W),
                                                 "dense floor": dense_gemms(x, W, gy, False)}),
                          ("fwd+bwd", "x@W^T + dY@W only", {"peft": step(pf, x, gy), "qru": step(q, x, gy),
                                                            "floor": base_gemms(x, W, gy),
                                                            "dense floor": dense_gemms(x, W, gy, True)}))
                if p == dropouts[0]:
                    t, ratio = interleaved({"torch": thin_products(x, A, B, gy, False),
                                            "one thread": thin_products(x, A, B, gy, True)}, samples, "cpu")
                    for k in t:
                        rows.append(Row.of(SUITE, "rank-r products", k, f"M{tokens} {n_in}->{n_out} r{r}", "fp32",
                                           "cpu", t[k], ratio=ratio[k]))
                    print(f"  {shape} rank-r products: torch at {torch.get_num_threads()} threads "
                          f"{t['torch'].median * 1e3:.2f} ms, one thread {t['one thread'].median * 1e3:.2f} ms "
                          f"({ratio['one thread']:.2f}x)", flush=True)
                for op, floor_op, fns in groups:
                    t, ratio = interleaved(fns, samples, "cpu")
                    for k in fns:
                        name = op if "floor" not in k else floor_op
                        rows.append(Row.of(SUITE, name + (" [thread clock]" if CLOCK == "thread" else ""), k, shape,
                                           "fp32", "cpu", t[k], ratio=ratio[k]))
                    print(f"  {shape} {op}: qru {t['qru'].median * 1e3:.1f} ms, peft {t['peft'].median * 1e3:.1f} ms, "
                          f"torch GEMMs alone {t['floor'].median * 1e3:.1f} ms, qru's dense GEMMs alone "
                          f"{t['dense floor'].median * 1e3:.1f} ms; speed-up {ratio['qru']:.2f}x (median of paired "
                          f"ratios); peft/torch floor {ratio['floor']:.2f}x (the most a LoRA on torch's GEMMs can "
                          f"reach), qru over its floor {t['qru'].median / t['dense floor'].median:.2f}x",
                          flush=True)
                del q, pf
    return rows


def gpu_section(shapes, ranks, tokens):
    if not torch.cuda.is_available():
        print("\n## lora GPU section skipped: no CUDA device")
        return []
    rows = []
    dtype = torch.bfloat16
    for n_in, n_out in shapes:
        for r in ranks:
            W, A, B, x, gy = make_inputs(tokens, n_in, n_out, r, dtype, "cuda")
            alpha = 2.0 * r
            q = qru_layer(W, A, B, alpha, 0.0)
            pf = peft_layer(W, A, B, alpha, 0.0)
            Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()

            def unfused():
                x.grad = Ar.grad = Br.grad = None
                lora_linear_reference(x, W, None, Ar, Br, alpha / r).backward(gy)

            fns = {"qru-triton": step(q, x, gy), "torch-unfused": unfused, "peft": step(pf, x, gy)}
            fl = flops(tokens, n_in, n_out, r)
            times = {k: bench(f, device="cuda") for k, f in fns.items()}
            shape = f"M{tokens} {n_in}->{n_out} r{r}"
            for k, t in times.items():
                ratio = times["peft"].median / t.median
                rows.append(Row.of(SUITE, "fwd+bwd", k, shape, "bf16", "cuda", t, unit="TFLOP/s",
                                   scale=lambda s: fl / s / 1e12, ratio=ratio))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, r=16 only, fewer repeats")
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--samples", type=int, default=None, help="timed calls per provider and shape")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="CPU timer: wall clock, or the thread's CPU time (needs --threads 1)")
    add_allocator_arg(ap)
    args = ap.parse_args(argv)
    if args.allocators is not None:
        return run_under_allocators(__file__, argv, args.allocators)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread needs --threads 1")
    global CLOCK
    CLOCK = args.clock
    if args.quick:
        tokens, shapes, ranks, samples = 512, [(1024, 1024), (1024, 2752)], [16], args.samples or 9
    else:
        tokens, shapes, ranks, samples = 2048, [(4096, 4096), (4096, 11008)], [16, 32, 64], args.samples or 7
    print(f"## lora CPU: qru vs peft, fp32, {torch.get_num_threads()} threads, {CLOCK} clock")
    rows = cpu_section(shapes, ranks, args.dropout, tokens, samples)
    report("lora forward and forward+backward, CPU (vs peer = peft time / this time)", rows)
    if not args.no_gpu:
        gpu_rows = gpu_section(shapes, ranks, tokens)
        if gpu_rows:
            report("lora forward+backward, GPU (TFLOP/s; vs peer = peft time / this time)", gpu_rows)


if __name__ == "__main__":
    sys.exit(main())

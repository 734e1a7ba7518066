"""Weight quantize / dequantize throughput: qru C++ and qru reference vs bitsandbytes' CPU path,
bf16 weights, same run. A plain copy moving the same number of bytes (read + write) is timed
in the same rotation and serves as the bandwidth roofline.

bitsandbytes, qru C++ and the copy are called one at a time, in turn, each turn's order from a
balanced rotation (``harness.balanced_orders``: every provider runs right after every other equally
often), so outside load and the previous call's after-effects (its caches, its OpenMP threads still
spinning) hit all of them alike; the speed-up is the median of the paired per-turn ratios (peer
time / provider time); the printed line adds the ratio of total times over the samples, which
counts the few calls a stall (a thread kept off its core) makes slow. Samples are a multiple of the rotation's length (four orders for four providers). The torch reference is timed after that rotation (ratio of medians): its
multi-GB temporaries, freed between calls, otherwise slow the next provider's page faults.
NF4/FP4 also time ``qru-cpp-all-threads``: the same C++ kernel on all torch threads, without the
busy-machine thread rule of ``qru.kernels.threads``. The thread rule in force and the load are printed. Integer formats (no bitsandbytes peer) compare C++ with the reference. llama.cpp's GGUF block
formats (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, mxfp4) compare with ``gguf.quants`` (llama.cpp's
reference numpy quantizers; fed the weights already converted to a fp32 numpy array, since numpy
has no bf16) in the same rotation; gguf cannot quantize q4_k, whose quantize compares with the
reference. The GPU section covers NF4 only.

CPU targets (printed, not tested): NF4 quantize >= 30x bitsandbytes, NF4 dequantize >= 1.5x, also with
``--busy 1``: that many one-thread busy loops (other jobs) run on the machine throughout the CPU
section, and the shapes carry " +N busy" in the table and the CSV.
GPU section (skipped without CUDA): Triton vs bitsandbytes CUDA as % of peak bandwidth.

    python bench/bench_quant.py [--quick] [--formats nf4 fp4 int4 int4_sym int8 q4_0 q4_k mxfp4 ...]
                                [--samples N] [--threads N] [--busy N]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Row, bench, paired, report  # noqa: E402
from qru.kernels import calibrate, quant4, quant_gguf, quant_int  # noqa: E402
from qru.kernels._backend import load_cpp_ext  # noqa: E402

SUITE = "quant"
TARGETS = {("nf4", "quantize"): 30.0, ("nf4", "dequantize"): 1.5}


def traffic(fmt: str, shape: tuple[int, int], block: int | None) -> tuple[int, int]:
    """(bytes read, bytes written) by quantize of a bf16 weight; dequantize swaps them."""
    n = math.prod(shape)
    if fmt in quant_gguf.GGUF_FORMATS:
        packed = quant_gguf.n_blocks(fmt, n) * quant_gguf.TYPE_SIZE[fmt]
    elif fmt in ("nf4", "fp4"):
        packed = (n + 1) // 2 + 4 * math.ceil(n / block)
    elif fmt == "int8":
        packed = n + 4 * shape[0]
    else:
        groups = shape[0] * math.ceil(shape[1] / block)
        packed = n // 2 + groups * (4 + (fmt == "int4"))
    return 2 * n, packed


def copy_fn(nbytes: int, device: str = "cpu"):
    """A plain copy moving ``nbytes`` in total (reads nbytes / 2, writes nbytes / 2)."""
    src = torch.ones(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def providers_4bit(w, fmt, block):
    import bitsandbytes.functional as F

    n = w.numel()
    bq, st = F.quantize_4bit(w, blocksize=block, quant_type=fmt)
    packed, absmax = quant4._quantize_cpp(w, fmt, block)
    if not (torch.equal(packed, bq.reshape(-1)) and torch.equal(absmax, st.absmax)):
        raise RuntimeError(f"qru and bitsandbytes disagree on {fmt} {tuple(w.shape)}")
    ext = load_cpp_ext("quant")
    _, bounds, order = quant4._tables(fmt, w.device)
    code = quant4.codebook(fmt, w.device)
    flat = w.reshape(-1)
    quant = {
        "bitsandbytes": lambda: F.quantize_4bit(w, blocksize=block, quant_type=fmt),
        "qru-cpp": lambda: quant4._quantize_cpp(w, fmt, block),
        # the same kernel on all torch threads, bypassing the busy-machine thread rule
        "qru-cpp-all-threads": lambda: ext.q4_quantize(flat, bounds, order, block, False),
    }
    deq = {
        "bitsandbytes": lambda: F.dequantize_4bit(bq, st),
        "qru-cpp": lambda: quant4._dequantize_cpp(packed, absmax, fmt, block, n, w.dtype),
        "qru-cpp-all-threads": lambda: ext.q4_dequantize(packed, absmax, code, block, n, w.dtype, False),
    }
    ref = {
        "quantize": lambda: quant4.quantize_4bit_reference(w, fmt, block),
        "dequantize": lambda: quant4.dequantize_4bit_reference(packed, absmax, fmt, block, n, w.dtype),
    }
    return quant, deq, ref


def providers_int(w, fmt, group):
    data, scales, zeros = quant_int._quantize_cpp(w, fmt, group)
    shape = tuple(w.shape)
    quant = {"qru-cpp": lambda: quant_int._quantize_cpp(w, fmt, group)}
    deq = {"qru-cpp": lambda: quant_int._dequantize_cpp(data, scales, zeros, fmt, shape, group, w.dtype)}
    ref = {
        "quantize": lambda: quant_int.quantize_int_reference(w, fmt, group),
        "dequantize": lambda: quant_int.dequantize_int_reference(data, scales, zeros, fmt, shape, group, w.dtype),
    }
    return quant, deq, ref


def providers_gguf(w, fmt):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    n = w.numel()
    w32 = w.float().numpy()  # gguf.quants works on fp32 numpy arrays (numpy has no bf16)
    data = quant_gguf._quantize_cpp(w, fmt)
    rows = data.numpy().reshape(w.shape[0], -1)
    if fmt != "q4_k" and not (data.numpy() == gguf.quants.quantize(w32, qtype).reshape(-1)).all():
        raise RuntimeError(f"qru and gguf.quants disagree on {fmt} {tuple(w.shape)}")
    quant = {"qru-cpp": lambda: quant_gguf._quantize_cpp(w, fmt)}
    if fmt != "q4_k":  # gguf.quants has no q4_k quantizer
        quant = {"gguf-numpy": lambda: gguf.quants.quantize(w32, qtype), **quant}
    deq = {"gguf-numpy": lambda: gguf.quants.dequantize(rows, qtype),
           "qru-cpp": lambda: quant_gguf._dequantize_cpp(data, fmt, n, w.dtype)}
    ref = {"quantize": lambda: quant_gguf.quantize_gguf_reference(w, fmt),
           "dequantize": lambda: quant_gguf.dequantize_gguf_reference(data, fmt, n, w.dtype)}
    return quant, deq, ref


@contextlib.contextmanager
def busy_jobs(n: int):
    """``n`` other jobs on the machine: one-thread busy loops in child processes, killed on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.2 if n else 0)  # let them start
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def cpu_section(shapes, formats, samples, busy: int = 0):
    rows, summary = [], []
    for shape in shapes:
        w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
        n = w.numel()
        sh = f"{shape[0]}x{shape[1]}" + (f" +{busy} busy" if busy else "")
        for fmt in formats:
            block = 64 if fmt in ("nf4", "fp4") else (None if fmt == "int8" else 128)
            if fmt in quant_gguf.GGUF_FORMATS:
                block = quant_gguf.BLOCK[fmt]
                quant, deq, ref = providers_gguf(w, fmt)
            elif fmt in ("nf4", "fp4"):
                quant, deq, ref = providers_4bit(w, fmt, block)
            else:
                quant, deq, ref = providers_int(w, fmt, block)
            read, written = traffic(fmt, shape, block)
            for op, fns in (("quantize", quant), ("dequantize", deq)):
                fns = dict(fns, **{"copy": copy_fn(read + written)})
                t, ratio = paired(fns, samples)
                t["qru-reference"] = bench(ref[op], warmup=1, repeats=max(2, samples // 2))
                peer = next((p for p in ("bitsandbytes", "gguf-numpy") if p in fns), None)
                if peer is not None:  # paired ratios; the reference: ratio of medians
                    ratio["qru-reference"] = t[peer].median / t["qru-reference"].median
                else:
                    peer = "qru-reference"
                    ratio = {k: t[peer].median / v.median for k, v in t.items()}
                gbs = lambda s: (read + written) / s / 1e9  # noqa: E731
                for prov, tim in t.items():
                    if prov == "copy":
                        rows.append(Row.of(SUITE, f"{fmt}_{op}", "copy", sh, "bf16", "cpu", tim, unit="GB/s",
                                           scale=gbs))
                        continue
                    rows.append(Row.of(SUITE, f"{fmt}_{op}", prov, sh, "bf16", "cpu", tim, unit="Gparam/s",
                                       scale=lambda s: n / s / 1e9, ratio=ratio[prov]))
                roof = t["copy"].median / t["qru-cpp"].median
                rows.append(Row.of(SUITE, f"{fmt}_{op}", "qru-cpp", sh, "bf16", "cpu", t["qru-cpp"], unit="GB/s",
                                   scale=gbs, ratio=roof))
                summary.append((fmt, op, sh, n / t["qru-cpp"].median / 1e9, gbs(t["qru-cpp"].median),
                                gbs(t["copy"].median), roof, peer, ratio["qru-cpp"]))
                # stalls (a thread kept off its core) hit a few calls hard: the total time shows them
                total = (f", total time {sum(t[peer].samples) / sum(t['qru-cpp'].samples):.2f}x"
                         if t[peer].samples and peer != "qru-reference" else "")
                print(f"  {fmt} {op} {sh}: qru-cpp {t['qru-cpp'].median * 1e3:.2f} ms "
                      f"({gbs(t['qru-cpp'].median):.2f} GB/s, {roof:.0%} of copy), "
                      f"{peer} {t[peer].median * 1e3:.2f} ms, speed-up {ratio['qru-cpp']:.2f}x{total}"
                      + (f" (all threads, no rule: {t['qru-cpp-all-threads'].median * 1e3:.2f} ms, "
                         f"{ratio['qru-cpp-all-threads']:.2f}x)" if "qru-cpp-all-threads" in t else ""), flush=True)
            del quant, deq, ref
    return rows, summary


def print_summary(summary):
    print("\n## quant CPU summary (qru-cpp; roofline = plain copy of the same bytes, same run)")
    print(f"{'format':8} {'op':10} {'shape':10} {'Gparam/s':>9} {'GB/s':>7} {'copy GB/s':>9} {'% roof':>7} "
          f"{'speed-up':>18}  target")
    for fmt, op, sh, gp, gb, cgb, roof, peer, ratio in summary:
        tgt = TARGETS.get((fmt, op))
        verdict = "" if tgt is None else f">= {tgt:g}x: {'MET' if ratio >= tgt else 'MISSED'}"
        print(f"{fmt:8} {op:10} {sh:10} {gp:9.2f} {gb:7.2f} {cgb:9.2f} {roof:7.0%} "
              f"{ratio:7.2f}x vs {peer.replace('qru-', ''):9}  {verdict}")


def gpu_section(shapes, samples):
    if not torch.cuda.is_available():
        print("\n## quant GPU section skipped: no CUDA device")
        return []
    import bitsandbytes.functional as F

    props = torch.cuda.get_device_properties(0)
    clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    peak = 2 * clock * 1e3 * width / 8 / 1e9 if clock and width else None
    rows = []
    for shape in shapes:
        w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
        n, sh = w.numel(), f"{shape[0]}x{shape[1]}"
        read, written = traffic("nf4", shape, 64)
        cp = copy_fn(read + written, "cuda")
        copy_gbs = (read + written) / bench(cp, device="cuda").median / 1e9
        peak_gbs = peak or copy_gbs
        bq, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        packed, absmax = quant4._quantize_triton(w, "nf4", 64)
        fns = {
            ("quantize", "bitsandbytes"): lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"),
            ("quantize", "qru-triton"): lambda: quant4._quantize_triton(w, "nf4", 64),
            ("dequantize", "bitsandbytes"): lambda: F.dequantize_4bit(bq, st),
            ("dequantize", "qru-triton"): lambda: quant4._dequantize_triton(packed, absmax, "nf4", 64, n, w.dtype),
        }
        times = {k: bench(f, device="cuda") for k, f in fns.items()}
        for (op, prov), t in times.items():
            gbs = (read + written) / t.median / 1e9
            ratio = times[(op, "bitsandbytes")].median / t.median
            rows.append(Row.of(SUITE, f"nf4_{op}", prov, sh, "bf16", "cuda", t, unit="GB/s",
                               scale=lambda s: (read + written) / s / 1e9, ratio=ratio))
            print(f"  nf4 {op} {sh} {prov}: {gbs:.0f} GB/s = {gbs / peak_gbs:.0%} of "
                  f"{'peak' if peak else 'copy'} {peak_gbs:.0f} GB/s (copy {copy_gbs:.0f} GB/s), "
                  f"vs bitsandbytes {ratio:.2f}x")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    all_formats = ["nf4", "fp4", "int4", "int4_sym", "int8", *quant_gguf.GGUF_FORMATS]
    ap.add_argument("--formats", nargs="+", default=all_formats, choices=all_formats)
    ap.add_argument("--samples", type=int, default=None, help="timed calls per provider")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=0, help="one-thread busy loops (other jobs) running meanwhile")
    ap.add_argument("--no-gpu", action="store_true")
    args = ap.parse_args(argv)
    if args.busy < 0:
        ap.error(f"--busy must be >= 0, got {args.busy}")
    torch.set_num_threads(args.threads)
    if load_cpp_ext("quant") is None or load_cpp_ext("quant_gguf") is None:
        print("C++ quant extension unavailable (no compiler?): nothing to compare")
        return 1
    if args.quick:
        shapes, samples = [(1024, 1024), (2752, 1024)], args.samples or 8
    else:
        shapes, samples = [(4096, 4096), (11008, 4096)], args.samples or 8
    with busy_jobs(args.busy):
        rule = calibrate.decide("kernel_threads")
        print(f"## quant CPU, bf16 weights, {torch.get_num_threads()} threads, {samples} paired samples, "
              f"{args.busy} busy job(s) meanwhile; load {' '.join(Path('/proc/loadavg').read_text().split()[:4])}")
        print(f"kernel thread rule ({calibrate.load_state()} now): {rule.pick} [{rule.source}] {rule.why}")
        rows, summary = cpu_section(shapes, args.formats, samples, args.busy)
    report("quant CPU (Gparam/s rows: vs peer = bitsandbytes (GGUF formats: gguf.quants; ints, q4_k quantize: "
           "reference) time / this time; "
           "GB/s rows of qru-cpp: vs peer = fraction of the plain-copy bandwidth)", rows)
    print_summary(summary)
    if not args.no_gpu:
        gpu_rows = gpu_section(shapes, samples)
        if gpu_rows:
            report("quant GPU (GB/s; vs peer = bitsandbytes time / this time)", gpu_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

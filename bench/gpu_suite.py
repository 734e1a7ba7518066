"""The GPU suite: one script, <= 5 minutes on one GPU, the same CSV as the CPU suites.

Sections (each timed with ``harness.bench`` / ``harness.paired`` on CUDA; a section that would
start after the budget is spent is skipped and says so):

* ``quant``: NF4 quantize / dequantize of a bf16 4096 x 4096 weight, qru Triton vs bitsandbytes,
  as % of the plain-copy bandwidth measured on the same device for the same bytes;
* ``qmatmul``: the fused NF4 kernel vs dequantize + cuBLAS over the rows, the data for
  ``qmatmul.TRITON_FUSED_MAX_ROWS``;
* ``lora``: LoRA fwd+bwd (r 16, bf16, 2048 tokens): an NF4 base against peft on a bitsandbytes
  ``Linear4bit`` (QLoRA), without and with dropout (qru's mask hashed in the kernels), and a
  dense base against peft;
* ``step``: the unlearning step (NPO+GDR, LoRA and full; bf16) against HF transformers + peft
  (``bench_step.run_mode``), and the LoRA step over NF4 bases (QLoRA) against peft + bitsandbytes;
* ``generate``: greedy generation, bf16 and NF4, against transformers (+ bitsandbytes)
  (``bench_generate.section``).

Without CUDA it prints ``no CUDA: skipped`` and exits 0. No number from it is in any doc until
it has run on a GPU.

    python bench/gpu_suite.py [--sections quant lora ...] [--budget 300]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_lora import wrap_peft  # noqa: E402
from bench.harness import RESULTS_CSV, Row, Timing, bench, paired, report  # noqa: E402

SUITE = "gpu"
BUDGET_S = 300.0
QUANT_SHAPE = (4096, 4096)
QMM_SHAPE = (4096, 4096)  # (out, in)
QMM_ROWS = (1, 8, 16, 32, 64, 128, 256)
LORA_SHAPES = ((4096, 4096), (4096, 11008))  # (in, out)
LORA_TOKENS, LORA_RANK, LORA_DROPOUT = 2048, 16, 0.1


# ----------------------------------------------------------------------------- rows (pure)


def copy_rows(op: str, shape: str, times: dict[str, Timing], nbytes: int, copy: Timing, peer: str) -> list[Row]:
    """Rows in % of the copy bandwidth: ``100 · t_copy / t`` per provider (the copy moving the
    same ``nbytes``), plus the copy itself in GB/s; ``vs peer`` = peer time / this time."""
    rows = [Row.of(SUITE, op, "copy", shape, "bf16", "cuda", copy, unit="GB/s", scale=lambda s: nbytes / s / 1e9)]
    for prov, t in times.items():
        rows.append(Row.of(SUITE, op, prov, shape, "bf16", "cuda", t, unit="% copy",
                           scale=lambda s: 100.0 * copy.median / s, ratio=times[peer].median / t.median))
    return rows


def time_rows(op: str, shape: str, dtype: str, times: dict[str, Timing], peer: str, unit: str = "s",
              work: float | None = None) -> list[Row]:
    """Rows per provider: seconds, or ``work / s`` in ``unit`` when ``work`` is given."""
    scale = (lambda s: work / s) if work is not None else None
    return [Row.of(SUITE, op, prov, shape, dtype, "cuda", t, unit=unit, scale=scale,
                   ratio=times[peer].median / t.median) for prov, t in times.items()]


def run_sections(sections: dict[str, Callable[[], list[Row]]], budget_s: float,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[list[Row], list[str]]:
    """Run the sections in order while the budget lasts; returns the rows and one note per
    section (its time, or why it was skipped). A section that raises is reported, not fatal."""
    rows, notes = [], []
    start = clock()
    for name, fn in sections.items():
        spent = clock() - start
        if spent >= budget_s:
            notes.append(f"{name}: skipped (budget of {budget_s:.0f} s spent)")
            continue
        t0 = clock()
        try:
            got = fn()
        except Exception as exc:  # a peer missing a CUDA kernel, out of memory, ...
            notes.append(f"{name}: failed ({type(exc).__name__}: {str(exc).strip()[:200]})")
            continue
        rows += got
        notes.append(f"{name}: {len(got)} rows in {clock() - t0:.0f} s")
    return rows, notes


# ----------------------------------------------------------------------------- sections (CUDA)


def _copy(nbytes: int):
    src = torch.ones(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def quant_section() -> list[Row]:
    import bitsandbytes.functional as F

    from qru.kernels import quant4

    w = (torch.randn(QUANT_SHAPE, device="cuda") * 0.02).to(torch.bfloat16)
    n = w.numel()
    nbytes = 2 * n + (n + 1) // 2 + 4 * -(-n // 64)  # bf16 + packed codes + absmax, read + written
    copy = bench(_copy(nbytes), device="cuda")
    bq, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    packed, absmax = quant4._quantize_triton(w, "nf4", 64)
    if not torch.equal(packed, bq.reshape(-1)):
        raise RuntimeError("qru and bitsandbytes disagree on nf4 codes")
    sh = f"{QUANT_SHAPE[0]}x{QUANT_SHAPE[1]}"
    q = {"bitsandbytes": bench(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"), device="cuda"),
         "qru-triton": bench(lambda: quant4._quantize_triton(w, "nf4", 64), device="cuda")}
    d = {"bitsandbytes": bench(lambda: F.dequantize_4bit(bq, st), device="cuda"),
         "qru-triton": bench(lambda: quant4._dequantize_triton(packed, absmax, "nf4", 64, n, w.dtype),
                             device="cuda")}
    return copy_rows("nf4_quantize", sh, q, nbytes, copy, "bitsandbytes") + \
        copy_rows("nf4_dequantize", sh, d, nbytes, copy, "bitsandbytes")


def qmatmul_section() -> list[Row]:
    import torch.nn.functional as TF

    import qru.quant as Q
    from qru.kernels import qmatmul

    n, k = QMM_SHAPE
    qt = Q.quantize(torch.randn(n, k, device="cuda").to(torch.bfloat16), "nf4", 64)
    data, absmax = qt.data, qt.absmax()
    rows = []
    for m in QMM_ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

        def dequant_linear():
            w = qmatmul.dequantize_weight(data, absmax, None, "nf4", 64, n, k, x.dtype)
            return TF.linear(x, w)

        times = {"dequant+cublas": bench(dequant_linear, device="cuda"),
                 "qru-fused": bench(lambda: qmatmul._quant_linear_triton(x, data, absmax, None, "nf4", 64, n, None),
                                    device="cuda")}
        rows += time_rows("qmatmul nf4", f"M{m} {k}->{n}", "bf16", times, "dequant+cublas", unit="TFLOP/s",
                          work=2 * m * n * k / 1e12)
    print(f"  qmatmul: TRITON_FUSED_MAX_ROWS = {qmatmul.TRITON_FUSED_MAX_ROWS}; the fused kernel should win "
          f"up to it (vs peer > 1) and lose above it")
    return rows


def _peft_qlora(W, A, B, alpha, dropout=0.0):
    import bitsandbytes as bnb

    n_out, n_in = W.shape
    holder = torch.nn.Module()
    holder.proj = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16,
                                    compress_statistics=False, quant_type="nf4")
    holder.proj.weight = bnb.nn.Params4bit(W.cpu(), requires_grad=False, compress_statistics=False,
                                           quant_type="nf4", blocksize=64)
    holder.cuda()
    return wrap_peft(holder, A, B, alpha, dropout)


def lora_section() -> list[Row]:
    from bench import bench_lora as BL
    from qru.model.lora import LoRALinear

    rows = []
    for n_in, n_out in LORA_SHAPES:
        W, A, B, x, gy = BL.make_inputs(LORA_TOKENS, n_in, n_out, LORA_RANK, torch.bfloat16, "cuda")
        alpha = 2.0 * LORA_RANK
        shape = f"M{LORA_TOKENS} {n_in}->{n_out} r{LORA_RANK}"
        work = BL.flops(LORA_TOKENS, n_in, n_out, LORA_RANK) / 1e12
        pq = _peft_qlora(W, A, B, alpha)
        st = pq.base_layer.weight.quant_state
        nf4 = _nf4_qtensor(pq.base_layer.weight.data, st.absmax, (n_out, n_in))
        qq = LoRALinear.from_nf4(nf4, LORA_RANK, alpha, compute_dtype=torch.bfloat16, init=(A, B)).train()
        qd = LoRALinear.from_nf4(nf4, LORA_RANK, alpha, compute_dtype=torch.bfloat16, init=(A, B),
                                 dropout=LORA_DROPOUT).train()
        pqd = _peft_qlora(W, A, B, alpha, LORA_DROPOUT)
        qlora, peft4 = "qru-triton", "peft+bitsandbytes"
        cases = [
            ("fwd+bwd nf4", {peft4: BL.step(pq, x, gy), qlora: BL.step(qq, x, gy)}, peft4),
            (f"fwd+bwd nf4 p{LORA_DROPOUT:g}", {peft4: BL.step(pqd, x, gy), qlora: BL.step(qd, x, gy)}, peft4),
            ("fwd nf4", {peft4: BL.forward(pq, x), qlora: BL.forward(qq, x)}, peft4),
            ("fwd+bwd", {"peft": BL.step(BL.peft_layer(W, A, B, alpha, 0.0), x, gy),
                         qlora: BL.step(BL.qru_layer(W, A, B, alpha, 0.0), x, gy)}, "peft"),
        ]
        for name, fns, peer in cases:
            times = {k: bench(f, device="cuda") for k, f in fns.items()}
            rows += time_rows(f"lora {name}", shape, "bf16", times, peer, unit="TFLOP/s",
                              work=work if "bwd" in name else work / 3)
    return rows


def _nf4_qtensor(packed: torch.Tensor, absmax: torch.Tensor, shape):
    """bitsandbytes' packed NF4 codes (block 64) and absmax as qru's packed-weight type (its codebook,
    ``qru.kernels.quant4.NF4_CODE``, is bitsandbytes' NF4 map: tests/test_quant_bnb.py)."""
    from qru.kernels.qtensor import QTensor

    return QTensor(data=packed.reshape(-1), scales=absmax.float().reshape(-1), zeros=None, shape=torch.Size(shape),
                   dtype=torch.bfloat16, fmt="nf4", block_size=64)


def _bnb_linear(lin: torch.nn.Linear):
    """A bitsandbytes NF4 ``Linear4bit`` (block 64, no nested absmax, bf16 compute) of ``lin``."""
    import bitsandbytes as bnb

    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.bfloat16,
                          compress_statistics=False, quant_type="nf4")
    m.weight = bnb.nn.Params4bit(lin.weight.detach().cpu(), requires_grad=False, compress_statistics=False,
                                 quant_type="nf4", blocksize=64)
    return m.to(lin.weight.device)


def qlora_models(cfg, device: str):
    """The LoRA models of ``bench_step.build_models`` with every targeted base in NF4, the same
    packed weights on both sides: peft's LoRA layers over bitsandbytes ``Linear4bit`` bases, and
    qru's ``LoRALinear.from_nf4`` over the bitsandbytes codes and absmax."""
    from bench import bench_step as BS
    from qru.model import lora as qlora
    from qru.model.lora import LoRALinear

    (q, _, _), (h, _, h_ctx) = BS.build_models(cfg, "lora", device)
    hmods = {n.split("base_model.model.", 1)[1]: m for n, m in h.named_modules()
             if "base_model.model." in n and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)}
    for name, m in list(qlora.lora_modules(q)):
        hm = hmods[name]
        hm.base_layer = _bnb_linear(hm.base_layer)
        w, st = hm.base_layer.weight, hm.base_layer.weight.quant_state
        nf4 = _nf4_qtensor(w.data, st.absmax, (m.out_features, m.in_features))
        new = LoRALinear.from_nf4(nf4, m.r, m.lora_alpha, compute_dtype=cfg.dtype, lora_dtype=m.lora_A.dtype,
                                  init=(m.lora_A.detach(), m.lora_B.detach()))
        new.lora_A.requires_grad_(True)
        new.lora_B.requires_grad_(True)
        q.set_submodule(name, new.train())
    return (q, q, lambda: qlora.disable_adapters(q)), (h, h, h_ctx)


def qlora_step_rows(cfg, pairs: int, device: str = "cuda") -> list[Row]:
    """The unlearning step (LoRA, reference forward every step on both sides: the same work)
    over NF4 bases, qru against peft + bitsandbytes."""
    from bench import bench_step as BS

    (q, q_ref, q_ctx), (h, h_ref, h_ctx) = qlora_models(cfg, device)
    fb, rb = BS.make_batches(cfg, device)
    peer = "peft+bitsandbytes"
    fns = {peer: BS.hf_step(h, h_ref, h_ctx, fb, rb, cfg),
           "qru": BS.qru_step(q, fb, rb, cfg, ref_model=q_ref, ref_ctx=q_ctx)}
    BS.first_steps(fns, "qlora", 3e-2)
    t, ratio = paired(fns, pairs, device=device, warmup=0)
    tokens = 2 * cfg.batch * cfg.seq
    return [Row.of(SUITE, "unlearn_step qlora nf4 (same work)", k, cfg.shape, "bf16", device, t[k], unit="tok/s",
                   scale=lambda s: tokens / s, ratio=ratio[k]) for k in fns]


def step_section() -> list[Row]:
    from bench import bench_step as BS

    rows = []
    cfg = BS.StepConfig(seq=512, batch=4, dtype=torch.bfloat16)
    for mode in ("lora", "full"):
        print(f"\n## unlearn step, {mode} mode, CUDA\nconfig: {cfg.describe(mode)}", flush=True)
        rows += BS.run_mode(cfg, mode, 5, "cuda", "bf16")
    print(f"\n## unlearn step, QLoRA (NF4 bases), CUDA\nconfig: {cfg.describe('lora')}", flush=True)
    rows += qlora_step_rows(cfg, 5)
    return rows


def generate_section() -> list[Row]:
    from bench import bench_generate as BG

    return BG.section(BG.SMALL, ["bf16", "nf4"], 8, 64, 3, "cuda", "small")


# Cheapest first: the budget check runs before each section.
SECTIONS = {"quant": quant_section, "qmatmul": qmatmul_section, "lora": lora_section,
            "generate": generate_section, "step": step_section}


def main(argv=None, csv_path: Path = RESULTS_CSV) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds; later sections are skipped past it")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA: skipped")
        return 0
    print(f"gpu_suite: {torch.cuda.get_device_name()}, budget {args.budget:.0f} s", flush=True)
    rows, notes = run_sections({k: SECTIONS[k] for k in args.sections}, args.budget)
    for line in notes:
        print(f"  {line}")
    if rows:
        report(f"GPU suite on {torch.cuda.get_device_name()} (vs peer = peer time / this time)", rows, csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end unlearning step (NPO + GDR): qru's training step against HF transformers
``LlamaForCausalLM`` + peft in a hand loop, same run, same config, same batches, same losses.

One step = forget forward/backward, retain forward/backward, grad-norm clip 1.0, AdamW,
zero_grad, plus NPO's reference sequence log-probs of the forget batch (no grad; LoRA: adapters
disabled, full: a frozen copy of the initial model). Tokens/s counts forget + retain tokens (what
``qru.train.loop`` logs). Providers:

* peer (``hf+peft`` / ``hf``): the standard hand loop: HF logits, the same ``qru.train.losses``
  formulas (``sequence_logprobs``, ``npo``, ``gdr``, ``combine``), the reference forward on every
  step (peft's ``disable_adapter`` / the frozen copy), HF's default sdpa attention, fp32,
  ``use_cache=False``.
* ``qru``: ``qru.train.unlearn.make_unlearn_step`` as ``unlearn`` builds it, over
  ``qru.model.llama.Llama`` (+ ``qru.model.lora.apply_lora``): the reference log-probs come from the
  per-example table ``unlearn`` computes once per run before training (``disable_adapters`` /
  the initial model); that forward is timed too and charged to every step divided by the run's
  epochs (``UnlearnConfig`` default, 5).
* ``qru same work``: the same step function with the reference forward on every step
  (``ref_model``/``ref_ctx``), exactly the peer's work.

Optimizer on both sides: torch's fused AdamW (qru's ``make_optimizer``; HF Trainer's default
``adamw_torch_fused``). Both sides start from the same weights and the same LoRA A/B; the first
(untimed) step checks they compute the same loss. The providers alternate step by step (ABBA); a
ratio is the median of the per-turn ratios. Peak memory of a step: tensor bytes allocated above the
step's start at the peak (CPU: the profiler's allocator accounting; CUDA: ``max_memory_allocated``),
on one more untimed step after the timed ones (optimizer state already allocated).

Threads: 1 by default. On this shared 2-core machine a second OpenMP thread that is descheduled
stalls every parallel region (~15 ms each), which makes both sides slower (measured: qru LoRA
187 vs 312 tok/s at 2 vs 1 threads) and the comparison a count of small ops; ``--threads 2``
on a quiet machine.

Targets (printed, not tested): qru >= 1.5x the peer in LoRA mode, >= 1.2x in full mode (CPU).
GPU section (skipped without CUDA): the same step on CUDA in fp32 and, where memory allows,
Llama-2-7B shapes in bf16 (LoRA mode).

    python bench/bench_step.py [--quick] [--modes lora full] [--pairs N] [--threads N] [--seq T] [--batch B]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Row, Timing, _quantile as _q, paired, peak_allocated_during, report  # noqa: E402
from qru.model import lora as qlora  # noqa: E402
from qru.model.config import LlamaConfig  # noqa: E402
from qru.model.llama import Llama  # noqa: E402
from qru.train import losses as L  # noqa: E402
from qru.train.data import Batch  # noqa: E402
from qru.train.config import DEFAULT_TARGETS, UnlearnConfig  # noqa: E402
from qru.train.loop import make_optimizer, model_sequence_logprobs  # noqa: E402
from qru.train.unlearn import make_unlearn_step  # noqa: E402

SUITE = "step"
EPOCHS = UnlearnConfig.__dataclass_fields__["epochs"].default  # the table is computed once per run
TARGETS = {"lora": 1.5, "full": 1.2}


@dataclass
class StepConfig:
    layers: int = 4
    hidden: int = 512
    intermediate: int = 1376
    heads: int = 8
    vocab: int = 32000
    seq: int = 512
    batch: int = 4
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-5
    beta: float = L.NPO_BETA
    dtype: torch.dtype = torch.float32

    def model_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    max_position_embeddings=max(2048, self.seq), rms_norm_eps=1e-6, tie_word_embeddings=False)

    def describe(self, mode: str) -> str:
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[self.dtype]
        lora = f", LoRA r={self.rank} alpha={self.alpha:g} on q,k,v,o,gate,up,down" if mode == "lora" else ""
        return (f"Llama {self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"heads {self.heads}, vocab {self.vocab}, {dt} weights; batch {self.batch} x seq {self.seq} "
                f"forget + the same retain; NPO(beta={self.beta:g}) + GDR, AdamW lr {self.lr:g}, clip 1.0{lora}")

    @property
    def shape(self) -> str:
        return f"L{self.layers} H{self.hidden} V{self.vocab} B{self.batch} T{self.seq}"


def make_batches(cfg: StepConfig, device, seed: int = 0) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(2):
        ids = torch.randint(3, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
        ones = torch.ones_like(ids)
        out.append(Batch(ids, ones, ones, torch.arange(k * cfg.batch, (k + 1) * cfg.batch)).to(device))
    return out[0], out[1]


def build_models(cfg: StepConfig, mode: str, device):
    """qru Llama and HF LlamaForCausalLM with the same weights (and the same LoRA A/B)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hcfg = HFConfig(**cfg.model_kwargs(), attention_dropout=0.0)
    if device == "cpu":
        q = Llama(LlamaConfig(**cfg.model_kwargs()))
        q.init_weights(seed=0)
        h = LlamaForCausalLM(hcfg)
    else:  # built and initialised on the device (7B shapes: no fp32 copy of both on the host)
        with torch.device("meta"):
            q = Llama(LlamaConfig(**cfg.model_kwargs()))
        q.to_empty(device=device)
        with torch.device(device):
            q.init_weights()
            h = LlamaForCausalLM(hcfg)
    q.to(device=device, dtype=cfg.dtype)
    h.to(device=device, dtype=cfg.dtype)
    missing, unexpected = h.load_state_dict(q.state_dict(), strict=False)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"HF model does not take qru's state dict: missing {missing}, unexpected {unexpected}")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        qlora.apply_lora(q, targets=list(DEFAULT_TARGETS), r=cfg.rank, alpha=cfg.alpha, dropout=0.0,
                         lora_dtype=cfg.dtype, seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a trained-looking adapter (B != 0), as after a few steps
            for _, m in qlora.lora_modules(q):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.01)
        h = get_peft_model(h, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                         target_modules=list(DEFAULT_TARGETS)))
        qmods = dict(qlora.lora_modules(q))
        with torch.no_grad():
            for name, m in h.named_modules():
                if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and "default" in m.lora_A:
                    key = name.split("base_model.model.", 1)[1]
                    m.lora_A["default"].weight.copy_(qmods[key].lora_A)
                    m.lora_B["default"].weight.copy_(qmods[key].lora_B)
        q_ref, q_ctx = q, (lambda: qlora.disable_adapters(q))
        h_ref, h_ctx = h, h.disable_adapter
    else:
        for p in q.parameters():
            p.requires_grad_(True)
        q_ref, h_ref = copy.deepcopy(q).eval(), copy.deepcopy(h).eval()
        for p in list(q_ref.parameters()) + list(h_ref.parameters()):
            p.requires_grad_(False)
        q_ctx = h_ctx = contextlib.nullcontext
    q.train()
    h.train()
    return (q, q_ref, q_ctx), (h, h_ref, h_ctx)


def optimizer_step(params, opt):
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def qru_step(model, fb: Batch, rb: Batch, cfg: StepConfig, **ref):
    """qru.train.unlearn's step: ``make_unlearn_step`` (the function ``unlearn`` builds), then backward,
    clip, the loop's optimizer. ``ref``: ``ref_logp=`` a per-example table (what ``unlearn`` passes)
    or ``ref_model=``/``ref_ctx=`` for a reference forward on every batch."""
    step_fn = make_unlearn_step(model, method="npo", reg="gdr", beta=cfg.beta, **ref)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.lr, 0.0)  # qru.train.loop's: fused AdamW

    def run():
        losses = step_fn(fb, rb)
        losses["loss"].backward()
        optimizer_step(params, opt)
        return losses["loss"].detach()
    return run


def reference_table(ref_model, ref_ctx, fb: Batch, table: torch.Tensor):
    """What ``unlearn`` does once per run before training (``sequence_logp_table``): the reference
    sequence log-probs of the forget examples, here of this step's batch."""
    def run():
        with torch.no_grad(), ref_ctx():
            table[fb.index] = model_sequence_logprobs(ref_model, fb.input_ids, fb.loss_mask)[0].to(table.device)
        return table
    return run


def hf_step(model, ref_model, ref_ctx, fb: Batch, rb: Batch, cfg: StepConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, fused=True)  # HF Trainer's default ("adamw_torch_fused")

    def seq_logp(m, b: Batch):
        logits = m(input_ids=b.input_ids, use_cache=False).logits
        return L.sequence_logprobs(logits, b.input_ids, b.loss_mask)

    def run():
        with torch.no_grad(), ref_ctx():
            ref = seq_logp(ref_model, fb)[0]
        s, _ = seq_logp(model, fb)
        loss = L.combine(L.npo(s, ref, cfg.beta), L.gdr(*seq_logp(model, rb)))
        loss.backward()
        optimizer_step(params, opt)
        return loss.detach()
    return run


def first_steps(fns: dict, mode: str, rtol: float = 1e-3) -> None:
    """One untimed call per provider (the warm-up); checks the peer and qru (the first two entries)
    compute the same loss from the same weights."""
    losses = {k: fn() for k, fn in fns.items()}
    (pa, a), (pb, b) = ((k, float(v)) for k, v in list(losses.items())[:2])
    if abs(a - b) > rtol * max(1.0, abs(a)):
        raise RuntimeError(f"{mode}: {pa} loss {a:.6f} != {pb} loss {b:.6f}: the two steps differ")
    print(f"  {mode}: first-step loss {pa} {a:.6f}, {pb} {b:.6f} (same math)", flush=True)


def run_mode(cfg: StepConfig, mode: str, pairs: int, device: str, dtype_name: str) -> list[Row]:
    """Providers, called in turn: the peer (reference forward every step, the standard hand loop);
    qru as ``unlearn`` runs it (reference log-probs from the per-example table; the table's one
    forward per example is charged to each step divided by the run's epochs); qru doing the same
    work as the peer (reference forward every step)."""
    (q, q_ref, q_ctx), (h, h_ref, h_ctx) = build_models(cfg, mode, device)
    fb, rb = make_batches(cfg, device)
    peer = "hf+peft" if mode == "lora" else "hf"
    table = torch.zeros(2 * cfg.batch)
    fns = {peer: hf_step(h, h_ref, h_ctx, fb, rb, cfg),
           "table": reference_table(q_ref, q_ctx, fb, table)}
    fns["table"]()
    fns["qru"] = qru_step(q, fb, rb, cfg, ref_logp=table)
    fns["qru same work"] = qru_step(q, fb, rb, cfg, ref_model=q_ref, ref_ctx=q_ctx)
    fns = {k: fns[k] for k in (peer, "qru", "qru same work", "table")}
    first_steps(fns, mode, 1e-3 if cfg.dtype == torch.float32 else 3e-2)
    t, _ = paired(fns, pairs, device=device, warmup=0)
    # steady-state peak memory (optimizer state and model already there): one more call each
    peaks = {k: peak_allocated_during(fn, device) for k, fn in fns.items() if k != "table"}
    # qru as unlearn runs it: its step + the table forward amortized over the run's epochs
    real = [a + b / EPOCHS for a, b in zip(t["qru"].samples, t["table"].samples)]
    t["qru"] = Timing(statistics.median(real), _q(real, 0.2), _q(real, 0.8), real)
    ratio = {k: statistics.median(p / x for p, x in zip(t[peer].samples, t[k].samples)) for k in t}
    tokens = 2 * cfg.batch * cfg.seq
    rows = []
    for k in (peer, "qru", "qru same work"):
        rows.append(Row.of(SUITE, f"unlearn_step {mode}", k, cfg.shape, dtype_name, device, t[k], unit="tok/s",
                           scale=lambda s: tokens / s, ratio=ratio[k]))
    for k in (peer, "qru", "qru same work"):
        mib = peaks[k] / 2**20
        rows.append(Row(SUITE, f"unlearn_step {mode} peak memory", k, cfg.shape, dtype_name, device, mib, mib, mib,
                        "MiB", peaks[k] / max(1, peaks[peer])))
    del q, q_ref, h, h_ref, fns
    tps = {k: tokens / t[k].median for k in t if k != "table"}
    mem = "tensor memory allocated above the step's start, profiler" if device == "cpu" else "max_memory_allocated"
    print(f"  reference table forward (once per forget example per run): {t['table'].median:.2f} s per batch, "
          f"charged / {EPOCHS} epochs (UnlearnConfig default) to each qru step")
    print(f"  peak memory of one step ({mem}): qru {peaks['qru'] / 2**20:.0f} MiB, qru same work "
          f"{peaks['qru same work'] / 2**20:.0f} MiB, {peer} {peaks[peer] / 2**20:.0f} MiB")
    print(f"unlearn_step {mode} (same work: reference forward every step on both sides): qru "
          f"{tps['qru same work']:.0f} tok/s, {peer} {tps[peer]:.0f} tok/s, ratio {ratio['qru same work']:.2f}")
    print(f"unlearn_step {mode}: qru {tps['qru']:.0f} tok/s, {peer} {tps[peer]:.0f} tok/s, ratio {ratio['qru']:.2f}",
          flush=True)
    return rows


def cpu_section(cfg: StepConfig, modes, pairs: int) -> list[Row]:
    rows = []
    for mode in modes:
        print(f"\n## unlearn step, {mode} mode, CPU, {torch.get_num_threads()} threads\nconfig: {cfg.describe(mode)}",
              flush=True)
        rows += run_mode(cfg, mode, pairs, "cpu", "fp32")
        target = TARGETS[mode]
        print(f"  target: qru >= {target}x {'hf+peft' if mode == 'lora' else 'hf'} (same-run ratio above)")
    return rows


def gpu_section(modes, pairs: int) -> list[Row]:
    if not torch.cuda.is_available():
        print("\n## unlearn step GPU section skipped: no CUDA")
        return []
    rows = []
    for mode in modes:
        cfg = StepConfig()
        print(f"\n## unlearn step, {mode} mode, CUDA\nconfig: {cfg.describe(mode)}")
        rows += run_mode(cfg, mode, pairs, "cuda", "fp32")
    big = StepConfig(layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32000, seq=512, batch=4,
                     rank=16, alpha=32.0, dtype=torch.bfloat16)
    print(f"\n## unlearn step, lora mode, CUDA, Llama-2-7B shapes\nconfig: {big.describe('lora')}")
    try:
        rows += run_mode(big, "lora", pairs, "cuda", "bf16")
    except torch.OutOfMemoryError:
        print("  skipped: out of GPU memory for two 7B models")
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seq 256 and 2 paired steps (make bench)")
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--pairs", type=int, default=None, help="timed steps per provider")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see above)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 512; 256 with --quick)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no-gpu", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = args.pairs or (2 if args.quick else 5)
    cfg = StepConfig(layers=args.layers, seq=args.seq or (256 if args.quick else 512), batch=args.batch)
    rows = cpu_section(cfg, args.modes, pairs)
    report("unlearning step NPO+GDR, CPU (tok/s; vs peer = peer time / this time, median of paired steps)", rows)
    if not args.no_gpu:
        g = gpu_section(args.modes, pairs)
        if g:
            report("unlearning step NPO+GDR, GPU (tok/s; vs peer = peer time / this time)", g)


if __name__ == "__main__":
    main()

"""Evaluation generation: qru's batched greedy generation (static KV cache,
``qru.model.generate.generate_ids``) against transformers ``generate`` (greedy), same checkpoint
(saved once, loaded by both), same left-padded prompts, same batch, same ``max_new_tokens``, bf16.
NF4: qru's ``quantize_model(model, "nf4", 64)`` against transformers + bitsandbytes loading the
same checkpoint in 4-bit (nf4, block 64, bf16 compute) where bitsandbytes can on this device.

EOS is disabled on both sides so every row generates exactly ``max_new_tokens``; tokens/s counts
generated tokens. The providers alternate call by call (ABBA); the ratio is the median of the
paired ratios. The share of generated tokens on which both sides agree is printed (bf16 kernels
differ, so greedy paths may part after a near-tie). Peak memory: tensor bytes allocated during one
call (CPU: profiler accounting; CUDA: ``max_memory_allocated``).

Target (printed, not tested): qru >= 1.5x transformers (CPU, bf16).
GPU section (skipped without CUDA): the same on CUDA, plus Llama-2-7B shapes where memory allows.

    python bench/bench_generate.py [--quick] [--samples N] [--threads N] [--batch B] [--new N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (Row, add_allocator_arg, paired, peak_allocated_during, report,  # noqa: E402
                           run_under_allocators)
from qru.model.config import LlamaConfig  # noqa: E402
from qru.model.generate import generate_ids  # noqa: E402
from qru.model.llama import Llama  # noqa: E402

SUITE = "generate"
TARGET = 1.5
# intermediate 1408 = 22 x 64: bitsandbytes' packed CPU path (AVX-512 CPUs) needs in_features divisible by
# the block size (it fails on 1376 = 21.5 x 64); Llama's own 11008 = 172 x 64 is
SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             max_position_embeddings=2048)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=4096)


def save_checkpoint(kw: dict, path: Path) -> None:
    """A random bf16 checkpoint (built on meta, materialised in bf16: no fp32 copy at 7B shapes)."""
    with torch.device("meta"):
        m = Llama(LlamaConfig(**kw, torch_dtype="bfloat16"))
    m.to_empty(device="cpu")
    m.to(torch.bfloat16)
    m.init_weights(seed=0)
    with torch.no_grad():  # a peaked next-token distribution, as in a trained model: few near-ties
        m.lm_head.weight.mul_(20.0)
    m.save_pretrained(path)


def prompts(batch: int, vocab: int, lo: int = 32, hi: int = 96, seed: int = 0):
    """Left-padded (ids, mask) with lengths spread over [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.linspace(lo, hi, batch).round().long().tolist()
    width = max(lens)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for r, n in enumerate(lens):
        ids[r, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[r, width - n:] = 1
    return ids, mask


def qru_model(path: Path, fmt: str, device: str):
    m = Llama.from_pretrained(path, dtype=torch.bfloat16, device=device).eval()
    if fmt == "nf4":
        from qru.quant import quantize_model

        quantize_model(m, "nf4", 64)
    return m


def hf_model(path: Path, fmt: str, device: str):
    from transformers import LlamaForCausalLM

    if fmt == "nf4":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=False)
        m = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=q, device_map=device)
    else:
        m = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    m.generation_config.eos_token_id = None  # every row runs max_new_tokens, as on the qru side
    m.generation_config.pad_token_id = 0
    return m.eval()


def providers(qm, hm, ids, mask, new: int):
    def run_qru():
        return generate_ids(qm, ids, mask, max_new_tokens=new, eos_token_id=None, pad_token_id=0)

    def run_hf():
        with torch.no_grad():
            return hm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                               num_beams=1, pad_token_id=0)
    return {"transformers": run_hf, "qru": run_qru}


def run_one(path: Path, fmt: str, batch: int, new: int, samples: int, device: str, shape: str) -> list[Row]:
    qm = qru_model(path, fmt, device)
    try:
        hm = hf_model(path, fmt, device)
    except Exception as exc:  # bitsandbytes without a kernel for this device, etc.
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"  {fmt}: skipped: transformers+bitsandbytes cannot load the checkpoint in 4-bit on {device} "
              f"({type(exc).__name__}: {msg[:200]})")
        return []
    ids, mask = prompts(batch, qm.config.vocab_size)
    ids, mask = ids.to(device), mask.to(device)
    fns = providers(qm, hm, ids, mask, new)
    outs, peaks = {}, {}
    for k, fn in fns.items():  # the first (untimed) call: outputs and peak memory
        peaks[k] = peak_allocated_during(lambda: outs.__setitem__(k, fn()), device)
    a, b = outs["qru"][:, ids.shape[1]:], outs["transformers"][:, ids.shape[1]:]
    if a.shape != b.shape:
        raise RuntimeError(f"{fmt}: qru generated {tuple(a.shape)}, transformers {tuple(b.shape)}")
    agree = (a == b).float().mean().item()
    t, ratio = paired(fns, samples, device=device, warmup=0)
    tokens = batch * new
    rows = []
    for k in fns:
        rows.append(Row.of(SUITE, f"greedy {fmt}", k, shape, fmt if fmt == "nf4" else "bf16", device, t[k],
                           unit="tok/s", scale=lambda s: tokens / s, ratio=ratio[k]))
        mib = peaks[k] / 2**20
        rows.append(Row(SUITE, f"greedy {fmt} peak memory", k, shape, fmt if fmt == "nf4" else "bf16", device,
                        mib, mib, mib, "MiB", peaks[k] / max(1, peaks["transformers"])))
    print(f"  {fmt}: tokens agreeing with transformers {agree:.1%}; peak memory of one call: qru "
          f"{peaks['qru'] / 2**20:.0f} MiB, transformers {peaks['transformers'] / 2**20:.0f} MiB")
    print(f"generate {fmt}: qru {tokens / t['qru'].median:.0f} tok/s, transformers "
          f"{tokens / t['transformers'].median:.0f} tok/s, ratio {ratio['qru']:.2f}", flush=True)
    return rows


def section(kw: dict, formats, batch: int, new: int, samples: int, device: str, label: str) -> list[Row]:
    shape = f"L{kw['num_hidden_layers']} H{kw['hidden_size']} I{kw['intermediate_size']} V{kw['vocab_size']} B{batch} new{new}"
    print(f"\n## greedy generation, {device}: {label}\nconfig: Llama {kw['num_hidden_layers']} layers, hidden "
          f"{kw['hidden_size']}, intermediate {kw['intermediate_size']}, heads {kw['num_attention_heads']}, vocab "
          f"{kw['vocab_size']}, bf16 checkpoint; batch {batch} left-padded prompts of 32..96 tokens, "
          f"max_new_tokens {new}, greedy, no EOS", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(kw, Path(tmp))
        for fmt in formats:
            rows += run_one(Path(tmp), fmt, batch, new, samples, device, shape)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 timed calls each, 32 new tokens (make bench)")
    ap.add_argument("--formats", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    ap.add_argument("--samples", type=int, default=None, help="timed calls per provider")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: decoding is many small calls, and on a shared 2-core "
                         "machine each 2-thread parallel region can stall ~15 ms on a descheduled worker)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=None, help="max_new_tokens (default 64; 32 with --quick)")
    ap.add_argument("--no-gpu", action="store_true")
    add_allocator_arg(ap)
    args = ap.parse_args(argv)
    if args.allocators is not None:
        return run_under_allocators(__file__, argv, args.allocators)
    torch.set_num_threads(args.threads)
    samples = args.samples or (2 if args.quick else 5)
    args.new = args.new or (32 if args.quick else 64)
    rows = section(SMALL, args.formats, args.batch, args.new, samples, "cpu", f"{torch.get_num_threads()} threads")
    print(f"  target: qru >= {TARGET}x transformers (bf16, same-run ratio above)")
    report("greedy generation, CPU (tok/s; vs peer = transformers time / this time)", rows)
    if args.no_gpu:
        return
    if not torch.cuda.is_available():
        print("\n## greedy generation GPU section skipped: no CUDA")
        return
    rows = section(SMALL, args.formats, args.batch, args.new, samples, "cuda", "small")
    try:
        rows += section(LLAMA2_7B, args.formats, args.batch, args.new, samples, "cuda", "Llama-2-7B shapes")
    except torch.OutOfMemoryError:
        print("  Llama-2-7B shapes skipped: out of GPU memory")
    if rows:
        report("greedy generation, GPU (tok/s; vs peer = transformers time / this time)", rows)


if __name__ == "__main__":
    sys.exit(main())

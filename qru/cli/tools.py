"""``qru smoke``, ``qru doctor`` and ``qru convert``: the machine and model tools."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from qru.cli.common import csv_list
from qru.kernels import calibrate, machine, threads as kthreads
from qru.model.config import LlamaConfig
from qru.model.generate import generate_ids
from qru.model.gguf import convert_gguf
from qru.model.llama import Llama


def cmd_smoke(args) -> int:
    """Build a tiny model, save it, load it back, generate: the end-to-end smoke."""
    torch.manual_seed(args.seed)
    cfg = LlamaConfig.preset("tiny", vocab_size=256)
    model = Llama(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "tiny"
        model.save_pretrained(out)
        loaded = Llama.from_pretrained(out).eval()
        prompt = torch.randint(3, cfg.vocab_size, (2, 8))
        a = generate_ids(model, prompt, max_new_tokens=16)
        b = generate_ids(loaded, prompt, max_new_tokens=16)
        same = torch.equal(a, b)
        print(f"saved and reloaded {sum(p.numel() for p in model.parameters())/1e6:.2f}M params at {out}")
        print(f"greedy generation identical after reload: {same}; sample ids: {b[0, -16:].tolist()}")
    return 0 if same else 1


def add_smoke(sub) -> None:
    p = sub.add_parser("smoke", help="build a tiny model, save, load, generate")
    p.add_argument("--out", default=None, help="keep the checkpoint here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_smoke)


def cmd_doctor(args) -> int:
    """The machine, the per-machine kernel choices (measured once and cached) and why."""
    threads = sorted({int(t) for t in csv_list(args.threads)}) if args.threads else sorted({1, os.cpu_count() or 1})
    if any(t < 1 for t in threads):
        print(f"qru doctor: error: --threads must be positive integers, got {args.threads!r}", file=sys.stderr)
        return 2
    m = machine.describe()
    print(f"machine: {m['cpu_model']}; ISA level {m['isa']}; {m['cores']} cores; torch {m['torch']}; "
          f"allocator {m['allocator']}; CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    print(f"calibration cache: {calibrate.cache_root()}")
    rows = [(c, None) for c in calibrate.CHOICES if c not in calibrate.LOAD_AWARE]
    rows += [(c, s) for c in calibrate.CHOICES if c in calibrate.LOAD_AWARE for s in calibrate.LOAD_STATES]
    wc = max(len(calibrate.entry(c, s)) for c, s in rows)  # columns: the longest entry and candidate names
    wp = max(len(p) for cands, *_ in calibrate.CHOICES.values() for p in cands)
    for t in threads:
        now = calibrate.load_state(t)
        print(f"\n{t} thread{'s' if t > 1 else ''} ({calibrate.cache_path(t).name}; the machine is {now} now):")
        if t > 1:
            pool = kthreads.cpu_pool(t)
            if pool is None:
                print("  parallel C++ loops: none (the C++ kernels are unavailable)")
            else:
                where = "OpenMP (torch's pool)" if pool["pool"] == "omp" else "qru::Team"
                others = "unknown" if pool["others"] < 0 else pool["others"]
                forced = os.environ.get("QRU_CPU_POOL", "").strip()
                print(f"  parallel C++ loops now on: {where} (other processes' runnable tasks: {others}; "
                      f"usable cores: {pool['cores']}{'; QRU_CPU_POOL=' + forced if forced else ''})")
        for choice, state in rows:
            if state == calibrate.LOAD_STATES[1] and t <= 1:
                continue  # one thread: no thread rule, one row
            state = None if t <= 1 else state
            d = calibrate.decide(choice, threads=t, recalibrate=args.recalibrate and state in (None, now), load=state)
            name = calibrate.entry(choice, state)
            if d is None:
                print(f"  {name:{wc}s} -> {'?':{wp}s} [not measured] the first kernel call while the machine "
                      f"is {state} measures it")
            else:
                print(f"  {name:{wc}s} -> {d.pick:{wp}s} [{d.source}] {d.why}")
    print("\noverride a choice with QRU_<CHOICE>=<pick> (e.g. QRU_DENSE_FP32=torch); --recalibrate measures again "
          "(a load-aware choice: in the present load state)")
    return 0


def add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="the machine, the per-machine kernel choices and why, the cache path")
    p.add_argument("--threads", default=None, help="comma list of torch thread counts (default: 1 and all cores)")
    p.add_argument("--recalibrate", action="store_true", help="measure again and rewrite the cache")
    p.set_defaults(func=cmd_doctor)


def cmd_convert(args) -> int:
    """A llama.cpp GGUF Llama -> an HF checkpoint directory with its tokenizer files."""
    out = convert_gguf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite,
                       max_shard_size=args.max_shard_size)
    print(f"qru convert: wrote {args.dtype} checkpoint and tokenizer to {out}")

    special = json.loads((out / "special_tokens_map.json").read_text())
    if "pad_token" not in special:
        print(f"qru convert: note: the file names no pad token; qru pads with eos ({special.get('eos_token')!r})")
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="GGUF (llama.cpp) Llama -> HF checkpoint + tokenizer files")
    p.add_argument("model", help="MODEL.gguf (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q6_K/MXFP4 tensors)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the dequantized weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-shard-size", default="2GB", help="output shard size, e.g. 2GB, 500MB")
    p.set_defaults(func=cmd_convert)

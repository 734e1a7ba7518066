"""``qru pretrain`` and ``qru unlearn``: thin wrappers over :mod:`qru.train`'s dataclass configs."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from qru.cli.common import csv_list
from qru.kernels.threads import ADAPTIVE, check_threads
from qru.train.config import PretrainConfig, UnlearnConfig
from qru.train.pretrain import pretrain
from qru.train.state import work_dir
from qru.train.unlearn import unlearn


def _train_config(cls, args):
    """The dataclass config from the options given on the command line (others keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def _run_training(kind: str, fn, cfg) -> int:
    res = fn(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports the run
        return 0
    last = {k: v for k, v in (res.evals[-1] if res.evals else {}).items() if k.endswith("_nll")}
    first = {k: v for k, v in (res.evals[0] if res.evals else {}).items() if k.endswith("_nll")}
    nll = ", ".join(f"{k} {first.get(k, float('nan')):.3f} -> {v:.3f}" for k, v in last.items())
    for w in getattr(res, "warnings", []):
        print(f"qru {kind}: warning: {w}", file=sys.stderr)
    print(f"qru {kind}: {res.status} after {res.steps}/{res.total_steps} steps in {res.seconds:.1f}s; "
          f"trainable params {res.trainable_params:,} of {res.total_params:,}; {nll}; "
          + (f"output in {res.out}" if res.status == "done"
             else f"unfinished run in {work_dir(res.out)} (continue with --resume)"))
    return 0


def cmd_pretrain(args) -> int:
    """Train (or fine-tune) a model on text / QA data: an HF checkpoint with its tokenizer beside it."""
    return _run_training("pretrain", pretrain, _train_config(PretrainConfig, args))


def cmd_unlearn(args) -> int:
    """Unlearn a forget set (GA / NPO / SimNPO with GDR / KLR) in full or LoRA mode. Under
    ``torchrun --nproc-per-node N -m qru unlearn ...``: data parallel on FSDP2 (qru.train.distributed)."""
    return _run_training("unlearn", unlearn, _train_config(UnlearnConfig, args))


def threads_arg(text: str):
    """``--threads``: a positive integer or ``adaptive``."""
    if text == ADAPTIVE:
        return text
    try:
        return check_threads(int(text), "--threads")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or {ADAPTIVE!r}, got {text!r}") from None


def _add_train_options(p) -> None:
    S = argparse.SUPPRESS  # unset options keep the config's defaults
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--lr", type=float, default=S, help="peak learning rate")
    p.add_argument("--epochs", type=int, default=S)
    p.add_argument("--batch-size", type=int, default=S)
    p.add_argument("--grad-accum", type=int, default=S, help="micro-batches per optimizer step")
    p.add_argument("--max-len", type=int, default=S, help="max tokens per example")
    p.add_argument("--scheduler", choices=["constant", "cosine"], default=S, help="LR after warmup")
    p.add_argument("--warmup-steps", type=int, default=S)
    p.add_argument("--weight-decay", type=float, default=S)
    p.add_argument("--max-grad-norm", type=float, default=S, help="gradient clipping (0: off)")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=S, help="autocast compute dtype")
    p.add_argument("--master-dtype", choices=["fp32", "bf16"], default=S,
                   help="trainable weights and optimizer state dtype (bf16: no fp32 master copy)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=S)
    p.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=threads_arg, default=S,
                   help="CPU threads: N, or 'adaptive' (each step on the cores free of other jobs at its start, "
                        "at most torch's count: fast on a shared machine, results then depend on the load in the "
                        "last bits); default: torch's")
    p.add_argument("--format", dest="fmt", choices=["auto", "text", "qa"], default=S, help="data format")
    p.add_argument("--qa-loss", choices=["answer", "all"], default=S, help="QA loss on answer tokens or all")
    p.add_argument("--eval-samples", type=int, default=S, help="held-fixed examples per eval set")
    p.add_argument("--save-every", type=int, default=S, help="checkpoint every N steps (0: only on Ctrl-C)")
    p.add_argument("--stop-after", type=int, default=S, help="stop with a checkpoint after N steps")
    p.add_argument("--resume", action="store_true", default=S,
                   help="continue an interrupted run from its newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true", default=S,
                   help="replace an existing non-empty --out (kept intact until the new run finishes)")
    p.add_argument("--keep-checkpoint", action="store_true", default=S)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    p.add_argument("--cache-dir", default=S, help="token cache (default $QRU_CACHE/tokens or ~/.cache/qru/tokens)")


def add_pretrain(sub) -> None:
    S = argparse.SUPPRESS
    p = sub.add_parser("pretrain", help="train or fine-tune a model on text / QA data (HF checkpoint out)")
    p.add_argument("--config", default=S, help="model size preset (tiny, small) or a config.json path")
    p.add_argument("--data", nargs="+", required=True, help="text files, MUSE dirs, QA / text JSON(L) files")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer", default=S, help="tokenizer.model / tokenizer.json (or a directory holding one)")
    g.add_argument("--train-tokenizer", type=int, metavar="VOCAB", default=S,
                   help="train a BPE tokenizer of this vocabulary size on the data")
    p.add_argument("--init", default=S, help="fine-tune this checkpoint instead of training from scratch")
    _add_train_options(p)
    p.set_defaults(func=cmd_pretrain)


def add_unlearn(sub) -> None:
    S = argparse.SUPPRESS
    p = sub.add_parser("unlearn", help="unlearn a forget set: GA / NPO / SimNPO with GDR / KLR, full or LoRA")
    p.add_argument("--model", required=True, help="HF checkpoint directory (with tokenizer.json or tokenizer.model)")
    p.add_argument("--forget", nargs="+", required=True, help="forget data (QA JSON(L), text, MUSE dir)")
    p.add_argument("--retain", nargs="+", default=S, help="retain data")
    p.add_argument("--method", choices=["ga", "npo", "simnpo"], default=S)
    p.add_argument("--reg", choices=["none", "gdr", "klr"], default=S, help="retain regulariser")
    p.add_argument("--mode", choices=["full", "lora"], default=S)
    p.add_argument("--rank", type=int, default=S, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=S, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=S)
    p.add_argument("--targets", type=csv_list, default=S, help="comma list of LoRA target modules")
    p.add_argument("--beta", type=float, default=S, help="NPO / SimNPO beta (default 0.1 / 2.5)")
    p.add_argument("--delta", type=float, default=S, help="SimNPO margin")
    p.add_argument("--retain-weight", type=float, default=S, help="alpha in gamma*forget + alpha*retain")
    p.add_argument("--forget-weight", type=float, default=S, help="gamma in gamma*forget + alpha*retain")
    p.add_argument("--tokenizer", default=S, help="tokenizer.model / tokenizer.json (default: the model's)")
    p.add_argument("--train", choices=["all", "linears"], default=S,
                   help="full mode: train all parameters, or only the linears 4-bit export quantizes "
                        "(embeddings, norms, lm_head frozen)")
    p.add_argument("--lr-relative", type=float, default=S, metavar="X",
                   help="full mode: lr = X * std(W) per weight matrix (replaces --lr)")
    p.add_argument("--stall-threshold", type=float, default=S,
                   help="warn when the forget NLL moved less than this many nats (default 0.05)")
    g = p.add_argument_group("quantization-aware unlearning (docs/quant_aware.md)")
    g.add_argument("--quant-aware", type=csv_list, default=S, metavar="FMT[,FMT...]",
                   help="train through fake quantization of every export-quantized linear (straight-through "
                        "gradients): loss = L(full precision) + λ·L(quantized); formats as qru quantize")
    g.add_argument("--qa-weight", type=float, default=S, metavar="λ", help="weight of the quantized loss (default 1)")
    g.add_argument("--qa-sample", choices=["random", "sum"], default=S,
                   help="several formats: one random format per step (seeded; default) or the sum")
    g.add_argument("--qa-block-size", type=int, default=S, help="as qru quantize --block-size (default per format)")
    g.add_argument("--qa-skip", type=csv_list, default=S, help="as qru quantize --skip (default lm_head; '' for none)")
    g.add_argument("--qa-margin", type=float, default=S, metavar="M",
                   help="add a hinge keeping each forget sequence's quantized NLL >= its full-precision NLL + M "
                        "nats (default off)")
    g.add_argument("--qa-margin-weight", type=float, default=S, metavar="γ",
                   help="weight of the --qa-margin hinge (default 1)")
    g.add_argument("--qa-margin-grad", choices=["ste", "exact"], default=S,
                   help="the hinge's gradient: straight through the rounding (default), or exact (quantized side "
                        "detached: the rounding's a.e. derivative, zero)")
    p.add_argument("--saliency-mask", type=int, default=S, metavar="TOPK",
                   help="full mode: train only the TOPK modules with the largest forget-gradient norm (SURE, "
                        "Zhang et al. 2024)")
    _add_train_options(p)
    p.set_defaults(func=cmd_unlearn)

"""``qru plan``: the per-rank memory table of a sharded (FSDP2) training run (:mod:`qru.train.plan`)."""
from __future__ import annotations

import argparse
import json

from qru.train.plan import format_table, model_config, plan_table


def cmd_plan(args) -> int:
    """Print per-rank memory (weights, grads, optimizer, activations; GiB) for each mode, world size
    and with / without gradient checkpointing."""
    cfg = model_config(args.model)
    rows = plan_table(cfg, worlds=tuple(args.world_size), modes=tuple(args.mode), seq=args.seq, batch=args.batch,
                      master_dtype=args.master_dtype, precision=args.precision, rank=args.rank, train=args.train,
                      forwards=args.forwards)
    if args.json:
        print(json.dumps({"model": args.model, "params": cfg.num_parameters(), "rows": rows}, indent=2))
        return 0
    print(f"qru plan: {args.model}: {cfg.num_parameters() / 1e9:.2f}B parameters ({cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}); seq {args.seq}, {args.batch} row(s) per rank, {args.forwards} forward pass(es) "
          f"per step, master {args.master_dtype}, compute {args.precision}; per-rank GiB (formula: "
          "qru.train.plan)")
    print(format_table(rows))
    return 0


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return n


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of a sharded (FSDP2) run: weights, grads, optimizer, activations")
    p.add_argument("--model", required=True,
                   help="a config.json (or its directory), a preset (tiny, small, llama2-7b) or a size (7B, 350M)")
    p.add_argument("--mode", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    p.add_argument("--world-size", nargs="+", type=_positive, default=[1, 8, 16], help="ranks (GPUs) in total")
    p.add_argument("--seq", type=_positive, default=2048, help="tokens per row (--max-len)")
    p.add_argument("--batch", type=_positive, default=1, help="rows per rank per micro-batch (--batch-size / ranks)")
    p.add_argument("--master-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--rank", type=_positive, default=8, help="LoRA rank")
    p.add_argument("--train", choices=["all", "linears"], default="all", help="full mode's trained set")
    p.add_argument("--forwards", type=_positive, default=2,
                   help="forward passes alive at the backward (2: forget + retain batch; 1: GA alone, pretrain)")
    p.add_argument("--json", action="store_true", help="machine-readable rows")
    p.set_defaults(func=cmd_plan)

"""``qru eval``: MUSE / TOFU metrics of a checkpoint at several precisions."""
from __future__ import annotations

def cmd_eval(args) -> int:
    """Evaluate a checkpoint on MUSE or TOFU at one or more precisions."""
    from qru.eval.run import run_eval

    run_eval(args.model, args.benchmark, args.data, out=args.out, adapter=args.adapter,
             retrain_model=args.retrain_model, retrain_auc=args.retrain_auc, precisions=args.precision,
             limit=args.limit, seed=args.seed, batch_size=args.batch_size,
             score_batch_size=args.score_batch_size, max_len=args.max_len, block_size=args.block_size,
             forget_split=args.forget_split, retain_split=args.retain_split, device=args.device,
             progress=args.progress, overwrite=args.overwrite, quantize_head=args.quantize_head)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="MUSE / TOFU metrics of a checkpoint at several precisions")
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json or tokenizer.model)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory, merged in fp32 before quantizing")
    p.add_argument("--benchmark", required=True, choices=["muse", "tofu"])
    p.add_argument("--data", required=True, help="benchmark data directory (MUSE layout or TOFU JSON files)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--retrain-model", default=None,
                   help="retrained (MUSE) / retain (TOFU) reference checkpoint")
    g.add_argument("--retrain-auc", type=float, default=None, help="MUSE: the retrained model's AUC, in (0, 1)")
    p.add_argument("--precision", default="fp32", help="comma list of fp32,bf16,fp16,int8,nf4,fp4,int4,int4_sym,q8_0,q4_0,q4_1,q5_0,q5_1,q4_k,mxfp4")
    p.add_argument("--limit", type=int, default=None, help="first N items of each evaluated set")
    p.add_argument("--out", required=True, help="results JSON (one record per precision)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    p.add_argument("--score-batch-size", type=int, default=8, help="log-prob scoring batch size")
    p.add_argument("--max-len", type=int, default=None, help="max scored tokens per text (default: context)")
    p.add_argument("--block-size", type=int, default=64, help="quantization block size")
    p.add_argument("--quantize-head", action="store_true",
                   help="quantize an untied lm_head too (records say head_quantized; a tied head is an error)")
    p.add_argument("--forget-split", default="forget10", help="TOFU forget split (file stem)")
    p.add_argument("--retain-split", default="retain_perturbed", help="TOFU utility split (file stem)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=cmd_eval)

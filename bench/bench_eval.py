"""Evaluation throughput: batched (KV-cache generation, padded scoring batches) vs one item at
a time, on CPU, in the same run. Tokens/s counts prompt + generated tokens for generation
stages and scored-sequence tokens for PrivLeak / TOFU scoring; both providers process the
same tokens, so the ratio is the speed-up. Target: batched >= 3x one-by-one.

    .venv/bin/python bench/bench_eval.py [--preset small] [--n 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Row, bench, report  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def build(preset: str, tmp: Path):
    from qru.model.config import LlamaConfig
    from qru.model.llama import Llama
    from qru.model.tokenizer import Tokenizer

    muse = DATA / "muse-news"
    texts = [d["question"] + "\n" + d["answer"] for d in json.load(open(muse / "knowmem" / "retain_qa.json"))]
    texts += [d["prompt"][:4000] for d in json.load(open(muse / "verbmem" / "forget.json"))[:30]]
    texts += [json.loads(line)["answer"] for line in open(DATA / "tofu" / "full.json")][:1000]
    vocab = LlamaConfig.preset(preset).vocab_size
    tok = Tokenizer.train(texts, vocab, tmp / "tokenizer.model", seed=0)
    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset(preset, vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked next-token distribution: varied greedy text
    return model, tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--n", type=int, default=16, help="items per evaluated set")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on a shared 2-core box multi-threaded small GEMMs stall")
    args = ap.parse_args()
    if not DATA.exists():
        print(f"shared data not found at {DATA}; nothing to benchmark")
        return 0
    torch.set_num_threads(args.threads)
    from qru.eval import muse, tofu

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build(args.preset, Path(tmp))
    n, bs = args.n, args.batch_size
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
    rows, tot = [], {"batched": [0, 0.0], "one-by-one": [0, 0.0]}
    for name, run in workloads.items():
        res = {}
        for provider, b in (("batched", bs), ("one-by-one", 1)):
            tokens = run(b)["throughput"]["tokens"]
            t = bench(lambda: run(b), warmup=0, repeats=args.repeats, threads=args.threads)
            res[provider] = (tokens, t)
            tot[provider][0] += tokens
            tot[provider][1] += t.median
        ratio = (res["batched"][0] / res["batched"][1].median) / (res["one-by-one"][0] / res["one-by-one"][1].median)
        for provider, (tokens, t) in res.items():
            rows.append(Row.of("eval", name, provider, f"{args.preset} n={n} bs={bs if provider == 'batched' else 1}",
                               "fp32", "cpu", t, unit="tok/s", scale=lambda s, k=tokens: k / s,
                               ratio=ratio if provider == "batched" else None))
    from bench.harness import Timing

    rates = {p: tot[p][0] / tot[p][1] for p in tot}
    overall = rates["batched"] / rates["one-by-one"]
    for p in tot:
        t = Timing(tot[p][1], tot[p][1], tot[p][1])
        rows.append(Row.of("eval", "all (sum of medians)", p, f"{args.preset} n={n}", "fp32", "cpu", t,
                           unit="tok/s", scale=lambda s, k=tot[p][0]: k / s,
                           ratio=overall if p == "batched" else None))
    report("eval throughput: batched vs one-by-one (CPU)", rows)
    print(f"\nbatched / one-by-one overall: {overall:.2f}x (target >= 3x): {'PASS' if overall >= 3 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale benchmark: Llama-2-7B-shaped checkpoint through ``qru quantize`` and ``qru survival``.

Writes a random bf16 checkpoint with the ``llama2-7b`` preset's shapes (``--layers N`` to
shrink) straight to disk in HF's sharded safetensors layout, one tensor in memory at a time,
plus a random rank-``--rank`` LoRA adapter on every linear of every layer (its update is
the ΔW for the survival run: cheaper on disk than a second checkpoint). Then runs, each as
a child process with ``OMP_NUM_THREADS=--threads``:

* ``qru quantize BASE --format nf4`` (streamed export);
* ``qru survival BASE --adapter ADAPTER --format <--formats>``;

and reports each child's wall time, CPU time (user + sys: steadier than wall on a shared
machine) and peak RSS (``os.wait4``'s ``ru_maxrss``), printed via
``bench/harness.py`` and appended to ``bench/results.csv``. Target (printed, not asserted):
peak RSS of the 7B-shaped quantize <= 3 GiB.

Needs ~45 GB free for the full 32 layers (base 13.5 GB + nf4 output ~3.9 GB + margin); the
run is skipped with a message when the disk has less (scaled by ``--layers``).

    python bench/bench_scale.py [--layers 2] [--keep DIR] [--formats nf4] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Row, Timing, peak_rss_bytes, report  # noqa: E402
from qru.model.checkpoint import INDEX, checkpoint_files, parse_size, staged_dir  # noqa: E402
from qru.model.config import LlamaConfig  # noqa: E402

SUITE = "scale"
ROOT = Path(__file__).resolve().parents[1]
QRU = ROOT / ".venv" / "bin" / "qru"
FULL_DISK_BYTES = 45e9
RSS_TARGET = 3 * 2**30
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tensor_specs(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint, in HF's order."""
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,))]
    if not cfg.tie_word_embeddings:
        out += [("lm_head.weight", (cfg.vocab_size, h))]
    return out


def _random_bf16(shape, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (1 << 22) // shape[1])  # fp32 temporaries of ~16 MB
    for r in range(0, shape[0], rows):
        out[r:r + rows] = torch.empty((min(rows, shape[0] - r), shape[1])).normal_(0.0, 0.02, generator=gen)
    return out


def write_checkpoint(cfg: LlamaConfig, path: Path, max_shard_size: str = "5GB", seed: int = 0) -> int:
    """Stream a random bf16 checkpoint to ``path`` (header first, then one tensor at a time).
    Returns the total tensor bytes."""
    specs = tensor_specs(cfg)
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        nb = math.prod(shape) * 2
        if shards[-1] and used + nb > limit:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nb
    gen = torch.Generator().manual_seed(seed)
    n = len(shards)
    weight_map, total = {}, 0
    with staged_dir(path) as stage:
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            header, off = {"__metadata__": {"format": "pt"}}, 0
            for name, shape in shard:
                nb = math.prod(shape) * 2
                header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
                off += nb
                weight_map[name] = fname
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)
            with open(stage / fname, "wb") as f:
                f.write(struct.pack("<Q", len(hb)) + hb)
                for name, shape in shard:
                    t = _random_bf16(shape, gen)
                    f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
                    total += t.numel() * 2
                    del t
        if n > 1:
            (stage / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2))
        (stage / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return total


def write_adapter(cfg: LlamaConfig, path: Path, rank: int = 16, seed: int = 1) -> None:
    """A random PEFT LoRA adapter (fp32, non-zero B) on every linear of every layer."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = dict(tensor_specs(cfg))
    sd = {}
    for n in range(cfg.num_hidden_layers):
        for m in LINEARS:
            out_f, in_f = shapes[f"model.layers.{n}.{m}.weight"]
            key = f"base_model.model.model.layers.{n}.{m}"
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
            sd[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    cfg_json = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
                "target_modules": sorted({m.split(".")[1] for m in LINEARS}), "task_type": "CAUSAL_LM",
                "use_rslora": False, "use_dora": False, "fan_in_fan_out": False}
    with staged_dir(path) as stage:
        save_file(sd, str(stage / "adapter_model.safetensors"), metadata={"format": "pt"})
        (stage / "adapter_config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")


def run_child(cmd: list[str], threads: int, log: Path) -> tuple[int, float, float, int]:
    """(exit code, wall seconds, CPU seconds (user + sys), peak RSS bytes) of one child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _has_quantize() -> bool:
    r = subprocess.run([str(QRU), "--help"], capture_output=True, text=True, cwd=ROOT)
    return "quantize" in r.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B)")
    ap.add_argument("--keep", default=None, help="generate into (or reuse from) this directory and keep it")
    ap.add_argument("--formats", default="nf4", help="survival formats (comma list)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the random adapter")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of the children")
    ap.add_argument("--max-shard-size", default="5GB", help="shard size of the generated checkpoint")
    ap.add_argument("--quantize-shard-size", default=None,
                    help="--max-shard-size for qru quantize (its output shards are buffered in memory)")
    ap.add_argument("--no-quantize", action="store_true")
    ap.add_argument("--no-survival", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = LlamaConfig.preset("llama2-7b", num_hidden_layers=args.layers)
    specs = tensor_specs(cfg)
    nbytes = sum(math.prod(s) * 2 for _, s in specs)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qru-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    need = FULL_DISK_BYTES * nbytes / 13.5e9
    free = shutil.disk_usage(work).free
    print(f"llama2-7b shapes, {args.layers} layers: {sum(math.prod(s) for _, s in specs) / 1e9:.2f}B params, "
          f"{nbytes / 1e9:.1f} GB bf16; work dir {work} ({free / 1e9:.0f} GB free, ~{need / 1e9:.0f} GB needed)")
    base, adapter = work / "base", work / "adapter"
    reuse = (base / "config.json").exists() and json.loads((base / "config.json").read_text()).get(
        "num_hidden_layers") == args.layers
    if not reuse and free < need:
        print(f"SKIP: {free / 1e9:.1f} GB free under {work}, need ~{need / 1e9:.0f} GB (use --layers to shrink)")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    rows: list[Row] = []
    shape = f"llama2-7b L{args.layers}"

    def row(op, provider, value, unit, dtype="bf16"):
        rows.append(Row.of(SUITE, op, provider, shape, dtype, "cpu", Timing(value, value, value), unit=unit))

    try:
        if reuse:
            print(f"reusing {base}")
        else:
            t0 = time.perf_counter()
            total = write_checkpoint(cfg, base, args.max_shard_size)
            wall = time.perf_counter() - t0
            print(f"generated {total / 1e9:.2f} GB in {len(checkpoint_files(base))} shard(s), {wall:.0f} s, "
                  f"bench process peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")
            row("generate (streamed) wall", "bench", wall, "s")
            row("generate peak RSS", "bench", peak_rss_bytes() / 2**30, "GiB")
        if not (adapter / "adapter_config.json").exists() or not reuse:
            write_adapter(cfg, adapter, args.rank)

        results = {}
        if args.no_quantize:
            print("--no-quantize: skipping the quantize run")
        elif not _has_quantize():
            print("qru quantize is not available in this tree yet: skipping the quantize run")
        else:
            out = work / "nf4"
            extra = ["--max-shard-size", args.quantize_shard_size] if args.quantize_shard_size else []
            rc, wall, cpu, rss = run_child([str(QRU), "quantize", str(base), "--format", "nf4", "--no-progress",
                                            *extra, "--out", str(out)], args.threads, work / "quantize.log")
            tail = (work / "quantize.log").read_text()[-2000:]
            if rc != 0:
                print(f"qru quantize failed (exit {rc}):\n{tail}")
            else:
                results["quantize"] = (wall, rss)
                print(f"qru quantize nf4: {wall:.0f} s wall, {cpu:.0f} s CPU, peak RSS {rss / 2**30:.2f} GiB "
                      f"(target <= {RSS_TARGET / 2**30:.0f} GiB: {'met' if rss <= RSS_TARGET else 'MISSED'}), "
                      f"output {_dir_bytes(out) / 1e9:.2f} GB")
                qs = f" shards {args.quantize_shard_size}" if args.quantize_shard_size else ""
                row(f"quantize nf4{qs} wall", "qru", wall, "s")
                row(f"quantize nf4{qs} CPU", "qru", cpu, "s")
                row(f"quantize nf4{qs} peak RSS", "qru", rss / 2**30, "GiB")
                row(f"quantize nf4{qs} throughput", "qru", nbytes / 1e9 / wall, "GB/s")
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
        if not args.no_survival:
            out = work / "survival"
            rc, wall, cpu, rss = run_child([str(QRU), "survival", str(base), "--adapter", str(adapter), "--format",
                                       args.formats, "--quiet", "--out", str(out)], args.threads,
                                      work / "survival.log")
            log = (work / "survival.log").read_text()
            if rc != 0:
                print(f"qru survival failed (exit {rc}):\n{log[-2000:]}")
            else:
                rep = json.loads((out / "survival.json").read_text())
                reps = {rep["format"]: rep} if "format" in rep else rep
                n_rows = {f: len(r["layers"]) for f, r in reps.items()}
                print(f"qru survival {args.formats}: {wall:.0f} s wall, {cpu:.0f} s CPU, peak RSS {rss / 2**30:.2f} GiB, rows {n_rows} "
                      f"(expected {7 * args.layers} each)")
                for f, r in reps.items():
                    o = r["overall"]
                    print(f"  {f}: overall survival_ratio {o['survival_ratio']:.4f}, projection "
                          f"{o['projection']:.4f}, code_flip_frac {o['code_flip_frac']:.4f}, "
                          f"below_half_step_frac {o['below_half_step_frac']:.4f}")
                fm = args.formats.replace(",", "+")
                row(f"survival {fm} wall (adapter r{args.rank})", "qru", wall, "s")
                row(f"survival {fm} CPU", "qru", cpu, "s")
                row(f"survival {fm} peak RSS", "qru", rss / 2**30, "GiB")
        if rows:
            report(f"scale: Llama-2-7B shapes, {args.layers} layers, {args.threads} thread(s)", rows)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

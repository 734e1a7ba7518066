"""The demo's training stages, each a cached :class:`qru.demo.stages.StageCache` stage: the synthetic
corpus, its tokenizer, the base model (pre-trained on the general people), the target and retrain
models (fine-tuned from the base) and one unlearned model per (method, mode, unlearning seed)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from pathlib import Path

from qru.demo.presets import DemoConfig
from qru.demo.stages import StageCache

RAW = ("general", "forget", "retain", "holdout")
SPACE = "\u2581"


def train_common(cfg: DemoConfig, progress: bool, device: str, cache_dir: Path) -> dict:
    return dict(max_len=cfg.model.max_len, precision="fp32", progress=progress, eval_samples=16,
                eval_batch_size=16, device=device, cache_dir=str(cache_dir), log_every=1)


def corpus_stage(cache: StageCache, cfg: DemoConfig, seed: int):
    from qru.data.synthetic import GENERATOR_VERSION, write_corpus

    c = cfg.corpus

    def build(d: Path):
        info = write_corpus(d / "data", people=c.people, seed=seed, retain=c.retain, holdout=c.holdout,
                            general=c.general, facts_per_person=c.facts_per_person,
                            docs_per_person=c.docs_per_person, icl=c.icl, privleak_docs=c.privleak_docs)
        return {"counts": info.counts}

    return cache.run("corpus", {"corpus": dataclasses.asdict(c), "seed": seed, "version": GENERATOR_VERSION}, build)


def tokenizer_stage(cache: StageCache, cfg: DemoConfig, corpus, seed: int):
    from qru.model.tokenizer import Tokenizer

    raw = corpus.dir / "data" / "raw"

    def build(d: Path):
        # "▁" (the space) as its own piece: the KnowMem prompt ends in "Answer: ", and with pieces like
        # "▁chess" a prompt ending in a bare "▁" would be a token sequence never seen in training.
        tok = Tokenizer.train([raw / f"{g}.txt" for g in RAW], cfg.model.vocab, d / "tokenizer.model", seed=seed,
                              user_defined_symbols=[SPACE])
        return {"vocab_size": tok.vocab_size}

    return cache.run("tokenizer", {"corpus": corpus.hash, "vocab": cfg.model.vocab, "seed": seed,
                                   "space_piece": True}, build)


def _arch(cfg: DemoConfig, vocab: int) -> dict:
    m = cfg.model
    return {"vocab_size": vocab, "hidden_size": m.hidden, "intermediate_size": m.ffn, "num_hidden_layers": m.layers,
            "num_attention_heads": m.heads, "num_key_value_heads": m.heads,
            "max_position_embeddings": max(256, m.max_len), "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 3, "model_type": "llama", "torch_dtype": "float32"}


def pack(files, passes: int, seed: int, out: Path) -> Path:
    """Write ``passes`` shuffled copies of the documents of ``files`` (blank-line separated) into ``out``.

    The training loop chunks a text file at fixed ``max_len`` boundaries; trained for many epochs on one
    fixed packing, a small model memorises each fact in the context of its neighbours and cannot recall it
    after a few-shot prompt. One loop epoch over ``passes`` random packings (a different document order per
    pass, as LM pre-training packs shuffled documents) sees every document ``passes`` times in varied contexts.
    """
    import random

    docs = [d.strip("\n") for f in files for d in Path(f).read_text(encoding="utf-8").split("\n\n") if d.strip()]
    parts = []
    for k in range(passes):
        order = list(docs)
        random.Random(f"qru-demo-pack:{seed}:{k}").shuffle(order)
        parts += order
    out.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return out


def _pretrain_kwargs(spec) -> dict:
    return dict(lr=spec.lr, epochs=1, batch_size=spec.batch_size, warmup_steps=spec.warmup_steps,
                scheduler=spec.scheduler, weight_decay=spec.weight_decay, master_dtype=spec.master_dtype)


def _summary(res) -> dict:
    ev = res.evals
    nll = {k: round(v, 4) for k, v in ev[-1].items() if k.endswith("_nll")} if ev else {}
    nll0 = {k: round(v, 4) for k, v in ev[0].items() if k.endswith("_nll")} if ev else {}
    return {"steps": res.steps, "seconds": round(res.seconds, 2), "params": res.total_params,
            "trainable_params": res.trainable_params, "nll_start": nll0, "nll_end": nll}


@contextlib.contextmanager
def _inputs_dir(d: Path):
    """A temporary directory beside the stage ``d`` for inputs its training reads."""
    with tempfile.TemporaryDirectory(dir=d.parent, prefix=f".{d.name}.inputs-") as tmp:
        yield Path(tmp)


def base_stage(cache, cfg, tok, seed, common):
    from qru.train.config import PretrainConfig
    from qru.train.pretrain import pretrain

    corpus_dir = cache.used["corpus"].dir / "data"
    vocab = tok.result["vocab_size"]

    def build(d: Path):
        with _inputs_dir(d) as tmp:  # the training inputs live beside the output, never inside it
            arch = tmp / "arch.json"
            arch.write_text(json.dumps(_arch(cfg, vocab)))
            data = pack([corpus_dir / "raw" / "general.txt"], cfg.base.epochs, seed, tmp / "packed.txt")
            res = pretrain(PretrainConfig(out=str(d), data=[str(data)], config=str(arch),
                                          tokenizer=str(tok.dir / "tokenizer.model"), seed=seed,
                                          **_pretrain_kwargs(cfg.base), **common))
        return _summary(res)

    return cache.run("base", {"tokenizer": tok.hash, "model": dataclasses.asdict(cfg.model),
                              "train": dataclasses.asdict(cfg.base), "seed": seed, "packed": True}, build)


def finetune_stage(cache, name, cfg, base, files, seed, common):
    from qru.train.config import PretrainConfig
    from qru.train.pretrain import pretrain

    corpus_dir = cache.used["corpus"].dir / "data"

    def build(d: Path):
        with _inputs_dir(d) as tmp:
            data = pack([corpus_dir / "raw" / f"{f}.txt" for f in files], cfg.target.epochs, seed,
                        tmp / "packed.txt")
            res = pretrain(PretrainConfig(out=str(d), data=[str(data)], init=str(base.dir), seed=seed,
                                          **_pretrain_kwargs(cfg.target), **common))
        return _summary(res)

    return cache.run(name, {"base": base.hash, "files": list(files), "train": dataclasses.asdict(cfg.target),
                            "seed": seed, "packed": True}, build)


def unlearn_stage(cache, cfg, target, method, mode, useed, common):
    from qru.train.config import UnlearnConfig
    from qru.train.unlearn import unlearn

    u = cfg.unlearn
    corpus_dir = cache.used["corpus"].dir / "data"
    meth, reg = method.split("_")
    lr = u.lr_full if mode == "full" else u.lr_lora
    name = f"unlearn-{method}-{mode}-s{useed}"

    def build(d: Path):
        res = unlearn(UnlearnConfig(out=str(d), model=str(target.dir), forget=[str(corpus_dir / "raw" / "forget.txt")],
                                    retain=[str(corpus_dir / "raw" / "retain.txt")], method=meth, reg=reg, mode=mode,
                                    lr=lr, epochs=u.epochs, batch_size=u.batch_size, rank=u.rank, alpha=u.alpha,
                                    master_dtype=u.master_dtype, scheduler=u.scheduler, seed=useed, train=u.train,
                                    **common))
        return _summary(res)

    key = {"target": target.hash, "method": method, "mode": mode, "lr": lr, "epochs": u.epochs,
           "batch_size": u.batch_size, "master_dtype": u.master_dtype, "scheduler": u.scheduler, "seed": useed}
    if mode == "lora":
        key.update(rank=u.rank, alpha=u.alpha)
    elif u.train != "all":  # keyed only when not the default, so earlier caches stay valid
        key["train"] = u.train
    return cache.run(name, key, build)


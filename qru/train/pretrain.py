"""Pre-training: ``pretrain(PretrainConfig) -> TrainResult`` trains a model from scratch (a preset or
a config.json, with a given or freshly trained tokenizer) or fine-tunes one (``init``) on text / QA
data, through :func:`qru.train.loop.train_loop`; outputs as :mod:`qru.train.unlearn`'s (a full
checkpoint), committed as :mod:`qru.train.state` describes.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from qru.data import format_qa
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.model.tokenizer import Tokenizer, load_tokenizer
from qru.kernels.threads import ADAPTIVE, step_threads
from qru.train import distributed as D
from qru.train import losses as L
from qru.train.config import PretrainConfig, TrainConfigError, TrainResult, check_vocab, model_dtype, validate_pretrain
from qru.train.data import Batch, detect_format, fixed_sample, load_sets, read_records
from qru.train.loop import (NonFiniteLossError, count_params, model_sequence_logprobs, resolve_device,
                            seed_all, train_loop)
from qru.train.state import claim_run, finish_run, write_run_json

TOKENIZER_FILE = "tokenizer.model"  # the file pretrain --train-tokenizer writes


def corpus_texts(paths, fmt: str = "auto") -> list[str]:
    """The training texts of the data sources, as the model will see them (QA records formatted)."""
    texts = []
    for p in paths:
        recs = read_records(p)
        kind = detect_format(recs, p) if fmt == "auto" else fmt
        if kind == "qa":
            texts += [format_qa(r["question"], r["answer"]) for r in recs]
        else:
            texts += [r["text"] for r in recs]
    return texts


def _need_model(model_dir: Path, what: str) -> None:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {model_dir / 'config.json'} does not exist")


def _model_config(spec: str, tok: Tokenizer, max_len: int) -> LlamaConfig:
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    p = Path(spec)
    if p.suffix == ".json" or p.is_dir():
        cfg = LlamaConfig.from_json(p)
        check_vocab(cfg.vocab_size, tok, p, "tokenizer")
        return cfg.replace(**ids)
    base = LlamaConfig.preset(spec)
    return base.replace(vocab_size=tok.vocab_size, max_position_embeddings=max(base.max_position_embeddings, max_len),
                        **ids)


def pretrain(cfg: PretrainConfig, stop_check: Callable[[torch.nn.Module], dict] | None = None) -> TrainResult:
    """Train a model from scratch (``config``) or fine-tune one (``init``) on text / QA data.
    ``stop_check``: an early-stopping rule checked at the end of each epoch (:func:`train_loop`).
    Under torchrun: data parallel on FSDP2 (:mod:`qru.train.distributed`); rank 0 owns the output."""
    t0 = time.perf_counter()
    validate_pretrain(cfg)
    device = resolve_device(cfg.device)
    with D.session(device) as d:
        D.check_batch(d, cfg.batch_size)

        def see_data():
            for p in cfg.data:
                if not Path(p).exists():
                    raise FileNotFoundError(f"training data not found: {p}")
        D.check_all(d, see_data)
        cfg_file = cfg.config if (Path(cfg.config).suffix == ".json" or Path(cfg.config).is_dir()) else None
        with contextlib.ExitStack() as owner:
            inputs = {"data": cfg.data, "init": cfg.init, "tokenizer": cfg.tokenizer, "config": cfg_file}
            out, work, resume = claim_run(d, owner, cfg.out, inputs, cfg.overwrite, cfg.resume)
            owner.enter_context(step_threads(cfg.threads if cfg.threads != ADAPTIVE else None))
            return _pretrain(cfg, t0, out, work, resume, d.device if d else device, stop_check, d)


def _pretrain(cfg: PretrainConfig, t0: float, out: Path, work: Path, resume: bool, device: torch.device,
              stop_check=None, d: D.Dist | None = None) -> TrainResult:
    seed_all(cfg.seed)
    main_rank = d is None or d.is_main
    if cfg.tokenizer is not None:
        tok, tok_src = D.check_all(d, lambda: load_tokenizer(cfg.tokenizer)), cfg.tokenizer
    elif cfg.train_tokenizer is not None:
        tok_file = work / TOKENIZER_FILE

        def train_tok():
            if not (resume and tok_file.is_file()):
                Tokenizer.train(corpus_texts(cfg.data, cfg.fmt), cfg.train_tokenizer, tok_file, seed=cfg.seed)
        D.on_main(d, train_tok)  # rank 0 trains it into the (shared) work directory
        tok, tok_src = D.check_all(d, lambda: Tokenizer(tok_file)), tok_file
    elif cfg.init is not None:
        tok, tok_src = D.check_all(d, lambda: load_tokenizer(cfg.init)), cfg.init
    else:
        raise TrainConfigError("pretrain needs a tokenizer: give tokenizer, train_tokenizer or init")
    dtype = model_dtype(cfg.master_dtype)
    if cfg.init is not None:
        def check_init():
            _need_model(Path(cfg.init), "init")
            init_cfg = LlamaConfig.from_json(cfg.init)
            check_vocab(init_cfg.vocab_size, tok, cfg.init, tok_src)
            return init_cfg
        model_cfg = D.check_all(d, check_init)
        load = lambda: Llama.from_pretrained(cfg.init, dtype=dtype, device=device if d is None else "cpu")  # noqa: E731
    else:
        model_cfg = _model_config(cfg.config, tok, cfg.max_len)
        load = lambda: Llama(model_cfg).to(device=device if d is None else "cpu", dtype=dtype)  # noqa: E731

    def prepare(model):
        model.gradient_checkpointing = cfg.gradient_checkpointing
    if d is None:
        model = load()
        prepare(model)
    else:  # rank 0 builds (the seeded initialisation) or loads the weights, the others get them broadcast
        model = D.load_sharded_pretrained(d, lambda: Llama(model_cfg).to(dtype), load, prepare, cfg.precision,
                                          cfg.master_dtype)
    data = D.check_all(d, lambda: load_sets(cfg.data, tok, cfg.max_len, cfg.fmt, cfg.qa_loss, cfg.cache_dir,
                                            role="training"))
    D.agree(d, "the training data (examples, tokens)", (len(data), data.num_tokens))
    trainable, total = count_params(model)

    def step_fn(b: Batch, _unused) -> dict:
        # the token mean, weighted by this rank's share of the global batch (1 in one process)
        return {"loss": L.mean_nll(*model_sequence_logprobs(model, b.input_ids, b.loss_mask)) * b.token_share}

    evals = {"train": data.subset(fixed_sample(len(data), cfg.eval_samples, cfg.seed))}
    info = {"trainable_params": trainable, "total_params": total, "examples": len(data),
            "tokens": data.num_tokens, "device": str(device), "world_size": d.world if d is not None else 1}
    run_json = (lambda extra: write_run_json(work, "pretrain", cfg, extra)) if main_rank else (lambda extra: None)
    run_json({**info, "status": "running"})
    try:
        steps, total_steps, status, rows = train_loop(model, step_fn, data, None, evals, cfg, work, tok.pad_id,
                                                      device, ("loss",), config_dict=asdict(cfg), desc="pretrain",
                                                      resume=resume, stop_check=stop_check, d=d)
    except KeyboardInterrupt:
        run_json({**info, "status": "interrupted"})
        raise
    except NonFiniteLossError as e:
        run_json({**info, "status": "failed", "error": str(e)})
        raise
    if status == "done":
        D.write_model(model, work, d)
        if main_rank:
            tok.save_pretrained(work)
    secs = time.perf_counter() - t0
    run_json({**info, "status": status, "steps": steps, "total_steps": total_steps, "seconds": secs,
              "final": rows[-1]})
    if status == "done" and main_rank:
        finish_run(work, out, cfg.keep_checkpoint)
    D.barrier(d)
    return TrainResult(out, status, steps, total_steps, trainable, total, rows, secs, model)

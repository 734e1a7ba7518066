"""Pre-training: ``pretrain(PretrainConfig) -> TrainResult`` trains a model from scratch (a preset or
a config.json, with a given or freshly trained tokenizer) or fine-tunes one (``init``) on text / QA
data, through :func:`qru.train.loop.train_loop`; outputs as :mod:`qru.train.unlearn`'s (a full
checkpoint), committed as :mod:`qru.train.state` describes.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from qru.io import check_output, target_lock
from qru.model.checkpoint import write_pretrained
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.model.tokenizer import Tokenizer, load_tokenizer
from qru.train import losses as L
from qru.train.config import PretrainConfig, TrainConfigError, TrainResult, check_vocab, model_dtype, validate_pretrain
from qru.train.data import Batch, detect_format, fixed_sample, format_qa, load_sets, read_records
from qru.train.loop import (NonFiniteLossError, count_params, model_sequence_logprobs, resolve_device,
                            seed_all, train_loop)
from qru.train.state import finish_run, prepare_work, write_run_json

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
    ``stop_check``: an early-stopping rule checked at the end of each epoch (:func:`train_loop`)."""
    t0 = time.perf_counter()
    validate_pretrain(cfg)
    for p in cfg.data:
        if not Path(p).exists():
            raise FileNotFoundError(f"training data not found: {p}")
    cfg_file = cfg.config if (Path(cfg.config).suffix == ".json" or Path(cfg.config).is_dir()) else None
    out = check_output(cfg.out, {"data": cfg.data, "init": cfg.init, "tokenizer": cfg.tokenizer, "config": cfg_file},
                       overwrite=cfg.overwrite, option="out")
    device = resolve_device(cfg.device)
    with target_lock(out):
        work, resume = prepare_work(out, cfg.resume, cfg.overwrite)
        return _pretrain(cfg, t0, out, work, resume, device, stop_check)


def _pretrain(cfg: PretrainConfig, t0: float, out: Path, work: Path, resume: bool, device: torch.device,
              stop_check=None) -> TrainResult:
    seed_all(cfg.seed)
    if cfg.tokenizer is not None:
        tok, tok_src = load_tokenizer(cfg.tokenizer), cfg.tokenizer
    elif cfg.train_tokenizer is not None:
        tok_file = work / TOKENIZER_FILE
        if not (resume and tok_file.is_file()):
            Tokenizer.train(corpus_texts(cfg.data, cfg.fmt), cfg.train_tokenizer, tok_file, seed=cfg.seed)
        tok, tok_src = Tokenizer(tok_file), tok_file
    elif cfg.init is not None:
        tok, tok_src = load_tokenizer(cfg.init), cfg.init
    else:
        raise TrainConfigError("pretrain needs a tokenizer: give tokenizer, train_tokenizer or init")
    dtype = model_dtype(cfg.master_dtype)
    if cfg.init is not None:
        if not (Path(cfg.init) / "config.json").is_file():
            raise FileNotFoundError(f"init checkpoint not found: {Path(cfg.init) / 'config.json'} does not exist")
        check_vocab(LlamaConfig.from_json(cfg.init).vocab_size, tok, cfg.init, tok_src)
        model = Llama.from_pretrained(cfg.init, dtype=dtype, device=device)
    else:
        model = Llama(_model_config(cfg.config, tok, cfg.max_len)).to(device=device, dtype=dtype)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    data = load_sets(cfg.data, tok, cfg.max_len, cfg.fmt, cfg.qa_loss, cfg.cache_dir, role="training")
    trainable, total = count_params(model)

    def step_fn(b: Batch, _unused) -> dict:
        return {"loss": L.mean_nll(*model_sequence_logprobs(model, b.input_ids, b.loss_mask))}

    evals = {"train": data.subset(fixed_sample(len(data), cfg.eval_samples, cfg.seed))}
    info = {"trainable_params": trainable, "total_params": total, "examples": len(data),
            "tokens": data.num_tokens, "device": str(device)}
    write_run_json(work, "pretrain", cfg, {**info, "status": "running"})
    try:
        steps, total_steps, status, rows = train_loop(model, step_fn, data, None, evals, cfg, work, tok.pad_id,
                                                      device, ("loss",), config_dict=asdict(cfg), desc="pretrain",
                                                      resume=resume, stop_check=stop_check)
    except KeyboardInterrupt:
        write_run_json(work, "pretrain", cfg, {**info, "status": "interrupted"})
        raise
    except NonFiniteLossError as e:
        write_run_json(work, "pretrain", cfg, {**info, "status": "failed", "error": str(e)})
        raise
    if status == "done":
        write_pretrained(model, work)
        tok.save_pretrained(work)
    secs = time.perf_counter() - t0
    write_run_json(work, "pretrain", cfg, {**info, "status": status, "steps": steps, "total_steps": total_steps,
                                            "seconds": secs, "final": rows[-1]})
    if status == "done":
        finish_run(work, out, cfg.keep_checkpoint)
    return TrainResult(out, status, steps, total_steps, trainable, total, rows, secs, model)

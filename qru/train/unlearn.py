"""Unlearning (GA / NPO / SimNPO with GDR / KLR, full fine-tuning or LoRA): ``unlearn(UnlearnConfig)
-> TrainResult`` and its step function ``make_unlearn_step``.

The reference model is never forwarded needlessly: NPO's reference sequence log-probs are computed
once for the whole forget set before the first step (the model *is* the reference then, in both
modes) and stored in the checkpoint; only KLR needs a per-batch reference forward (adapters
disabled in LoRA mode, a frozen copy loaded from the model directory in full mode).

Outputs in ``out``: ``metrics.jsonl`` (one row per logged step; eval rows carry ``forget_nll`` /
``retain_nll``), ``run.json``, the model (HF checkpoint, or a PEFT adapter in LoRA mode) and the
tokenizer files (``tokenizer.model``, or ``tokenizer.json`` and its configs); committed as
:mod:`qru.train.state` describes.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from qru.io import check_output, target_lock
from qru.model.checkpoint import write_pretrained
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.model.tokenizer import load_tokenizer
from qru.quant.qlinear import split_linears
from qru.train import losses as L
from qru.train.config import (METHODS, REGS, TrainConfigError, TrainResult, UnlearnConfig, check_vocab, model_dtype,
                              validate_unlearn)
from qru.train.data import Batch, fixed_sample, load_sets
from qru.train.loop import (NonFiniteLossError, StepFn, count_params, model_sequence_logprobs,
                            resolve_device, seed_all, sequence_logp_table, train_loop)
from qru.train.state import finish_run, prepare_work, read_checkpoint_state, write_run_json

def _lora():
    from qru.model import lora

    return lora


def quantized_linear_names(model: torch.nn.Module) -> list[str]:
    """The weight names 4-bit export quantizes with its default skip (``lm_head``): every plain
    ``nn.Linear`` but the head (:func:`qru.quant.qlinear.split_linears`, the function
    ``quantize_checkpoint`` / ``quantize_model`` use)."""
    return [f"{n}.weight" for n, _ in split_linears(model, ("lm_head",))[0]]


def module_type(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``up_proj``; the embeddings -> ``embed``, ``lm_head``
    -> ``head``, RMSNorm gains -> ``norm``; LoRA module names (no ``.weight``) likewise."""
    parts = name.split(".")
    if "embed_tokens" in parts:
        return "embed"
    if parts[0] == "lm_head":
        return "head"
    leaf = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    return "norm" if leaf.endswith("norm") else leaf


class UpdateProbe:
    """The relative update size ``||ΔW|| / ||W||`` per module type (Frobenius norms, pooled over
    the layers: sqrt(sum ||ΔW||²) / sqrt(sum ||W||²)), logged at every eval row.

    Full mode keeps a copy of the initial trainable tensors only, in their own dtype. LoRA mode
    keeps nothing: ΔW = s·B A, and ``||B A||²_F = sum((BᵀB) ⊙ (A Aᵀ))`` costs two r x r products.
    """

    def __init__(self, model: torch.nn.Module, lora_mode: bool):
        self.lora = None
        self.base: dict[str, float] = {}
        if lora_mode:
            self.lora = list(_lora().lora_modules(model))
            for name, m in self.lora:
                t = module_type(name)
                self.base[t] = self.base.get(t, 0.0) + float(m.weight.detach().float().pow(2).sum())
        else:
            self.init = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad}
            for n, (p, _) in self.init.items():
                t = module_type(n)
                self.base[t] = self.base.get(t, 0.0) + float(p.detach().float().pow(2).sum())

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        d: dict[str, float] = {t: 0.0 for t in self.base}
        if self.lora is not None:
            for name, m in self.lora:
                A, B = m.lora_A.float(), m.lora_B.float()
                d[module_type(name)] += m.scaling ** 2 * float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0))
        else:
            for n, (p, w0) in self.init.items():
                d[module_type(n)] += float((p.float() - w0.float()).pow(2).sum())
        return {t: math.sqrt(d[t]) / math.sqrt(self.base[t]) if self.base[t] > 0 else 0.0 for t in d}


def relative_lr_groups(model: torch.nn.Module, lr_relative: float) -> list[dict]:
    """One AdamW param group per trainable tensor with lr = ``lr_relative`` x std(W) (x RMS(w) for a
    vector); see :class:`UnlearnConfig`. Each group keeps its peak lr as ``base_lr`` (the schedule
    scales it) and its tensor's ``name``."""
    groups = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            w = p.detach().float()
            scale = float(w.std()) if w.dim() >= 2 and w.numel() > 1 else float(w.pow(2).mean().sqrt())
            lr = lr_relative * scale
            if not (math.isfinite(lr) and lr > 0):
                raise TrainConfigError(f"lr_relative: tensor {n!r} has std {scale}; cannot scale a learning rate by it")
            groups.append({"params": [p], "lr": lr, "base_lr": lr, "name": n})
    return groups


def stall_warnings(rows: list[dict], threshold: float) -> list[str]:
    """Warnings when the forget NLL (eval rows; else the logged forget loss) moved less than
    ``threshold`` nats from the first row to the last, with the update size and the levers."""
    evals = [r for r in rows if r.get("forget_nll") is not None]
    if len(evals) >= 2:
        what, a, b = "forget NLL", evals[0]["forget_nll"], evals[-1]["forget_nll"]
    else:
        losses = [r for r in rows if r.get("forget_loss") is not None]
        if len(losses) < 2:
            return []
        what, a, b = "forget loss", losses[0]["forget_loss"], losses[-1]["forget_loss"]
    if abs(b - a) >= threshold:
        return []
    upd = next((r["update"] for r in reversed(rows) if r.get("update")), None)
    size = f"; largest update ||dW||/||W|| {max(upd.values()):.2g}" if upd else ""
    return [f"{what} moved only {abs(b - a):.3g} nats ({a:.4g} -> {b:.4g}, threshold {threshold:g}){size}: the "
            "unlearning did next to nothing. Raise the learning rate (Adam changes each weight by about lr per "
            "step, so the lr that matters is relative to the weights' size, which depends on the width; "
            "--lr-relative sets it per matrix) or the epochs"]


def make_unlearn_step(model: torch.nn.Module, *, method: str, reg: str, beta: float,
                      delta: float = L.SIMNPO_DELTA, forget_weight: float = 1.0, retain_weight: float = 1.0,
                      ref_logp: torch.Tensor | None = None, ref_model: torch.nn.Module | None = None,
                      ref_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> StepFn:
    """The unlearning loss of one micro-batch: ``step_fn(forget_batch, retain_batch) -> {"loss",
    "forget_loss", "retain_loss"}`` (the caller runs backward and the optimizer; ``unlearn`` uses it).

    NPO's reference sequence log-probs come from ``ref_logp`` (per example, indexed by
    ``Batch.index``; what ``unlearn`` passes) or, when it is None, from a no-grad forward of
    ``ref_model`` under ``ref_ctx()`` on every batch (LoRA: the model itself with
    ``disable_adapters``; full: a frozen copy). KLR always forwards ``ref_model`` under ``ref_ctx()``.
    """
    if method not in METHODS:
        raise TrainConfigError(f"method must be one of {METHODS}, got {method!r}")
    if reg not in REGS:
        raise TrainConfigError(f"reg must be one of {REGS}, got {reg!r}")
    if method == "npo" and ref_logp is None and ref_model is None:
        raise TrainConfigError("method='npo' needs ref_logp (a table) or ref_model")
    if reg == "klr" and ref_model is None:
        raise TrainConfigError("reg='klr' needs ref_model")

    def step_fn(fb: Batch, rb: Batch | None) -> dict:
        if method == "npo":
            if ref_logp is not None:
                ref = ref_logp[fb.index]
            else:
                with torch.no_grad(), ref_ctx():
                    ref = model_sequence_logprobs(ref_model, fb.input_ids, fb.loss_mask)[0]
        s, n = model_sequence_logprobs(model, fb.input_ids, fb.loss_mask)
        if method == "ga":
            f_loss = L.ga(s, n)
        elif method == "npo":
            f_loss = L.npo(s, ref.to(s.device), beta)
        else:
            f_loss = L.simnpo(s, n, beta, delta)
        r_loss = None
        if reg == "gdr":
            r_loss = L.gdr(*model_sequence_logprobs(model, rb.input_ids, rb.loss_mask))
        elif reg == "klr":
            with torch.no_grad(), ref_ctx():
                ref_logits = ref_model(rb.input_ids)
            r_logits = model(rb.input_ids)
            r_loss = L.klr(r_logits[:, :-1], ref_logits[:, :-1], rb.loss_mask[:, 1:])
        loss = L.combine(f_loss, r_loss, forget_weight, retain_weight)
        return {"loss": loss, "forget_loss": f_loss, "retain_loss": r_loss}
    return step_fn


def unlearn(cfg: UnlearnConfig, stop_check: Callable[[torch.nn.Module], dict] | None = None) -> TrainResult:
    """Unlearn ``cfg.forget`` from ``cfg.model``; see the module docstring for the outputs.
    ``stop_check``: an early-stopping rule checked at the end of each epoch (:func:`train_loop`)."""
    t0 = time.perf_counter()
    validate_unlearn(cfg)
    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model checkpoint not found: {model_dir / 'config.json'} does not exist")
    out = check_output(cfg.out, {"model": model_dir, "forget data": cfg.forget, "retain data": cfg.retain,
                                 "tokenizer": cfg.tokenizer}, overwrite=cfg.overwrite, option="out")
    device = resolve_device(cfg.device)
    with target_lock(out):
        work, resume = prepare_work(out, cfg.resume, cfg.overwrite)
        return _unlearn(cfg, t0, model_dir, out, work, resume, device, stop_check)


def _unlearn(cfg: UnlearnConfig, t0: float, model_dir: Path, out: Path, work: Path, resume: bool,
             device: torch.device, stop_check=None) -> TrainResult:
    seed_all(cfg.seed)
    tok = load_tokenizer(cfg.tokenizer or model_dir)
    model_cfg = LlamaConfig.from_json(model_dir)
    check_vocab(model_cfg.vocab_size, tok, model_dir, cfg.tokenizer or model_dir)
    kw = dict(max_len=cfg.max_len, fmt=cfg.fmt, qa_loss=cfg.qa_loss, cache_dir=cfg.cache_dir)
    forget = load_sets(cfg.forget, tok, role="forget", **kw)
    retain = load_sets(cfg.retain, tok, role="retain", **kw) if cfg.retain else None
    pad = tok.pad_id

    dtype = model_dtype(cfg.master_dtype)
    model = Llama.from_pretrained(model_dir, dtype=dtype, device=device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    beta = cfg.effective_beta
    config_dict = asdict(cfg)

    # NPO's reference log-probs: the model is the reference before any update (LoRA's B = 0).
    ref_logp = None
    if cfg.method == "npo":
        if resume:
            ref_logp = read_checkpoint_state(work)["extra"]["ref_logp"]
        else:
            ref_logp = sequence_logp_table(model, forget, cfg.eval_batch_size, pad, device, cfg.precision)

    if cfg.mode == "lora":
        lora = _lora()
        # freezes the base; adapters in the master dtype (bf16: no fp32 copy anywhere)
        lora.apply_lora(model, targets=list(cfg.targets), r=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                        lora_dtype=dtype, seed=cfg.seed)
        ref_ctx = lambda: lora.disable_adapters(model)  # noqa: E731
        ref_model = model
    else:
        train = set(quantized_linear_names(model)) if cfg.train == "linears" else None
        for n, p in model.named_parameters():
            p.requires_grad_(train is None or n in train)
        ref_ctx = contextlib.nullcontext
        ref_model = None
        if cfg.reg == "klr":
            ref_model = Llama.from_pretrained(model_dir, dtype=dtype, device=device).eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)
    trainable, total = count_params(model)
    groups = relative_lr_groups(model, cfg.lr_relative) if cfg.lr_relative is not None else None
    probe = UpdateProbe(model, cfg.mode == "lora")

    step_fn = make_unlearn_step(model, method=cfg.method, reg=cfg.reg, beta=beta, delta=cfg.delta,
                                forget_weight=cfg.forget_weight, retain_weight=cfg.retain_weight,
                                ref_logp=ref_logp, ref_model=ref_model, ref_ctx=ref_ctx)

    evals = {"forget": forget.subset(fixed_sample(len(forget), cfg.eval_samples, cfg.seed))}
    if retain is not None:
        evals["retain"] = retain.subset(fixed_sample(len(retain), cfg.eval_samples, cfg.seed))
    aux = retain if cfg.reg != "none" else None
    info = {"mode": cfg.mode, "trainable_params": trainable, "total_params": total, "beta": beta,
            "forget_examples": len(forget), "retain_examples": len(retain) if retain is not None else 0,
            "device": str(device), "train": cfg.train if cfg.mode == "full" else "lora adapters",
            "trained_tensors": sorted(n for n, p in model.named_parameters() if p.requires_grad)
            if cfg.mode == "full" else None}
    if groups is not None:
        info["group_lrs"] = {g["name"]: g["lr"] for g in groups}
    print(f"qru unlearn: {cfg.method}+{cfg.reg} ({cfg.mode}) trainable params {trainable:,} / {total:,}",
          file=sys.stderr)
    write_run_json(work, "unlearn", cfg, {**info, "status": "running"})
    try:
        steps, total_steps, status, rows = train_loop(
            model, step_fn, forget, aux, evals, cfg, work, pad, device, ("loss", "forget_loss", "retain_loss"),
            extra_state={"ref_logp": ref_logp} if ref_logp is not None else None, config_dict=config_dict,
            desc=f"unlearn {cfg.method}+{cfg.reg}", resume=resume, param_groups=groups, update_probe=probe,
            stop_check=stop_check)
    except KeyboardInterrupt:
        write_run_json(work, "unlearn", cfg, {**info, "status": "interrupted"})
        raise
    except NonFiniteLossError as e:
        write_run_json(work, "unlearn", cfg, {**info, "status": "failed", "error": str(e)})
        raise
    if status == "done":
        if cfg.mode == "lora":
            _lora().write_adapter(model, work, base_model_name_or_path=str(model_dir))
        else:
            write_pretrained(model, work)
        tok.save_pretrained(work)
    secs = time.perf_counter() - t0
    warns = stall_warnings(rows, cfg.stall_threshold) if status == "done" else []
    write_run_json(work, "unlearn", cfg, {**info, "status": status, "steps": steps, "total_steps": total_steps,
                                           "seconds": secs, "final": rows[-1], "warnings": warns})
    if status == "done":
        finish_run(work, out, cfg.keep_checkpoint)
    return TrainResult(out, status, steps, total_steps, trainable, total, rows, secs, model, warnings=warns)



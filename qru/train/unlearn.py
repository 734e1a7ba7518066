"""Unlearning (GA / NPO / SimNPO with GDR / KLR, full fine-tuning or LoRA): ``unlearn(UnlearnConfig)
-> TrainResult`` and its step function ``make_unlearn_step``.

The reference model is never forwarded needlessly: NPO's reference sequence log-probs are computed
once for the whole forget set before the first step (the model *is* the reference then, in both
modes) and stored in the checkpoint; only KLR needs a per-batch reference forward (adapters
disabled in LoRA mode, a frozen copy loaded from the model directory in full mode).

Quantization-aware unlearning (``UnlearnConfig.quant_aware``, :mod:`qru.train.quant_aware`) adds
``L(quantized)`` to every step and ``code_flip_frac`` / ``forget_nll_q`` (per format) to the eval
rows; ``saliency_mask`` (:mod:`qru.train.saliency`) trains only the top-K modules by forget gradient.

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

from qru.model.config import LlamaConfig
from qru.model import lora
from qru.model.llama import Llama
from qru.model.tokenizer import load_tokenizer
from qru.quant.qlinear import resolve_block_size, split_linears
from qru.kernels.threads import ADAPTIVE, step_threads
from qru.train import distributed as D
from qru.train import losses as L
from qru.train.config import (METHODS, REGS, TrainConfigError, TrainResult, UnlearnConfig, check_vocab, model_dtype,
                              validate_unlearn)
from qru.train import quant_aware as qa
from qru.train import saliency as sal
from qru.train.data import Batch, collate, fixed_sample, load_sets
from qru.train.loop import (PAD_MULTIPLE, NonFiniteLossError, StepFn, autocast, count_params, eval_nll,
                            model_sequence_logprobs, resolve_device, seed_all, sequence_logp_table, train_loop)
from qru.train.state import claim_run, finish_run, read_checkpoint_state, write_run_json

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
    Sharded (``dist``): sums over this rank's shards, reduced over the ranks; ``BᵀB`` from the local
    rows of B (reduced), ``A Aᵀ`` from the whole A (gathered: r x in).
    """

    def __init__(self, model: torch.nn.Module, lora_mode: bool, dist: D.Dist | None = None):
        self.lora = None
        self.dist = dist
        self.base: dict[str, float] = {}
        if lora_mode:
            self.lora = list(lora.lora_modules(model))
            for name, m in self.lora:
                t = module_type(name)
                self.base[t] = self.base.get(t, 0.0) + float(D.local(m.weight).detach().float().pow(2).sum())
        else:
            self.init = {n: (p, D.local(p).detach().clone()) for n, p in model.named_parameters() if p.requires_grad}
            for n, (p, _) in self.init.items():
                t = module_type(n)
                self.base[t] = self.base.get(t, 0.0) + float(D.local(p).detach().float().pow(2).sum())
        self.base = self._sum(self.base)

    def _sum(self, d: dict[str, float]) -> dict[str, float]:
        if self.dist is None:
            return d
        keys = sorted(d)
        return dict(zip(keys, D.all_sum(self.dist, torch.tensor([d[k] for k in keys], dtype=torch.float64)).tolist()))

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        d: dict[str, float] = {t: 0.0 for t in self.base}
        if self.lora is not None and self.dist is not None:
            btb = D.all_sum(self.dist, torch.stack([D.local(m.lora_B).float().T @ D.local(m.lora_B).float()
                                                    for _, m in self.lora])).float()
            for (name, m), bb in zip(self.lora, btb):
                A = D.full(m.lora_A.detach()).float()
                d[module_type(name)] += m.scaling ** 2 * float((bb * (A @ A.T)).sum().clamp_min(0))
        elif self.lora is not None:
            for name, m in self.lora:
                A, B = m.lora_A.float(), m.lora_B.float()
                d[module_type(name)] += m.scaling ** 2 * float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0))
        else:
            for n, (p, w0) in self.init.items():
                d[module_type(n)] += float((D.local(p).float() - w0.float()).pow(2).sum())
            d = self._sum(d)
        return {t: math.sqrt(d[t]) / math.sqrt(self.base[t]) if self.base[t] > 0 else 0.0 for t in d}


def relative_lr_groups(model: torch.nn.Module, lr_relative: float, d: D.Dist | None = None) -> list[dict]:
    """One AdamW param group per trainable tensor with lr = ``lr_relative`` x std(W) (x RMS(w) for a
    vector); see :class:`UnlearnConfig`. Each group keeps its peak lr as ``base_lr`` (the schedule
    scales it) and its tensor's ``name``. Sharded: each tensor is gathered for its std."""
    groups = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            w = (D.full(p.detach()) if d is not None else p.detach()).float()
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
    "forget_loss", "retain_loss", "forget_seq_nll", "row_share"}`` (the caller runs backward and the
    optimizer; ``unlearn`` uses it). ``forget_seq_nll``: each forget sequence's token-mean NLL, with
    its graph (the input of the quant-aware margin, :func:`qru.train.quant_aware.margin_loss`);
    ``row_share``: the forget batch's share of the global batch's rows.

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
        # each term weighted by this batch's share of the global batch's denominator (1 in one
        # process; qru.train.distributed): rows for a sequence mean, target tokens for a token mean
        if method == "ga":
            f_loss = L.ga(s, n) * fb.token_share
        elif method == "npo":
            f_loss = L.npo(s, ref.to(s.device), beta) * fb.row_share
        else:
            f_loss = L.simnpo(s, n, beta, delta) * fb.row_share
        r_loss = None
        if reg == "gdr":
            r_loss = L.gdr(*model_sequence_logprobs(model, rb.input_ids, rb.loss_mask)) * rb.token_share
        elif reg == "klr":
            with torch.no_grad(), ref_ctx():
                ref_logits = ref_model(rb.input_ids)
            r_logits = model(rb.input_ids)
            r_loss = L.klr(r_logits[:, :-1], ref_logits[:, :-1], rb.loss_mask[:, 1:]) * rb.token_share
        loss = L.combine(f_loss, r_loss, forget_weight, retain_weight)
        # per-sequence forget NLL (token mean, with its graph; unscaled): the quant-aware margin's input
        seq_nll = -s.float() / n.float().clamp_min(1)
        return {"loss": loss, "forget_loss": f_loss, "retain_loss": r_loss, "forget_seq_nll": seq_nll,
                "row_share": fb.row_share}
    return step_fn


def check_model_options(cfg: UnlearnConfig, model_cfg: LlamaConfig) -> None:
    """The options that depend on the model's shapes, checked on a meta-device model (no weights
    loaded): every ``quant_aware`` format applies to every export-quantized linear, and
    ``saliency_mask`` does not exceed the number of trainable modules."""
    if cfg.quant_aware is None and cfg.saliency_mask is None:
        return
    with torch.device("meta"):
        meta = Llama(model_cfg)
    if cfg.quant_aware is not None:
        try:
            qa.check_applicable(meta, cfg.quant_aware, cfg.qa_block_size, cfg.qa_skip)
        except ValueError as e:
            raise TrainConfigError(str(e)) from None
    if cfg.saliency_mask is not None:
        train = set(quantized_linear_names(meta)) if cfg.train == "linears" else None
        for n, p in meta.named_parameters():
            p.requires_grad_(train is None or n in train)
        n_mod = len(sal.candidate_modules(meta))
        if cfg.saliency_mask > n_mod:
            raise TrainConfigError(f"saliency_mask must be at most the number of trainable modules ({n_mod} with "
                                   f"train={cfg.train!r}), got {cfg.saliency_mask}")


def saliency_modules(model: torch.nn.Module, cfg: UnlearnConfig, forget, pad: int, device: torch.device,
                     ref_logp: torch.Tensor | None) -> dict:
    """SURE's module saliency (:mod:`qru.train.saliency`): the gradient norm of the method's forget
    term over the whole forget set (batches weighted by their share of it), at the starting weights,
    per trainable module; returns ``{"topk", "modules" (chosen, largest first), "grad_norms"}``."""
    fstep = make_unlearn_step(model, method=cfg.method, reg="none", beta=cfg.effective_beta, delta=cfg.delta,
                              ref_logp=ref_logp)
    n = len(forget)

    def loss_fn(idx: list[int]) -> torch.Tensor:
        b = collate(forget, idx, pad, PAD_MULTIPLE).to(device)
        with autocast(device, cfg.precision):
            return fstep(b, None)["forget_loss"] * (len(idx) / n)

    bs = cfg.eval_batch_size
    norms = sal.module_grad_norms(model, loss_fn, (list(range(s, min(s + bs, n))) for s in range(0, n, bs)))
    return {"topk": cfg.saliency_mask, "modules": sal.top_modules(norms, cfg.saliency_mask), "grad_norms": norms}


def unlearn(cfg: UnlearnConfig, stop_check: Callable[[torch.nn.Module], dict] | None = None) -> TrainResult:
    """Unlearn ``cfg.forget`` from ``cfg.model``; see the module docstring for the outputs.
    ``stop_check``: an early-stopping rule checked at the end of each epoch (:func:`train_loop`).
    Under torchrun: data parallel on FSDP2 (:mod:`qru.train.distributed`); rank 0 owns the output."""
    t0 = time.perf_counter()
    validate_unlearn(cfg)
    model_dir = Path(cfg.model)
    device = resolve_device(cfg.device)
    with D.session(device) as d:
        D.check_batch(d, cfg.batch_size)
        D.check_all(d, lambda: _need_model(model_dir, "model"))
        if d is not None and (cfg.quant_aware is not None or cfg.saliency_mask is not None):
            raise TrainConfigError("--quant-aware and --saliency-mask run in one process only (not under torchrun yet)")
        D.check_all(d, lambda: check_model_options(cfg, LlamaConfig.from_json(model_dir)))
        with contextlib.ExitStack() as owner:
            inputs = {"model": model_dir, "forget data": cfg.forget, "retain data": cfg.retain,
                      "tokenizer": cfg.tokenizer}
            out, work, resume = claim_run(d, owner, cfg.out, inputs, cfg.overwrite, cfg.resume)
            owner.enter_context(step_threads(cfg.threads if cfg.threads != ADAPTIVE else None))
            return _unlearn(cfg, t0, model_dir, out, work, resume, d.device if d else device, stop_check, d)


def _need_model(model_dir: Path, what: str) -> None:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {model_dir / 'config.json'} does not exist")


def _unlearn(cfg: UnlearnConfig, t0: float, model_dir: Path, out: Path, work: Path, resume: bool,
             device: torch.device, stop_check=None, d: D.Dist | None = None) -> TrainResult:
    seed_all(cfg.seed)
    main_rank = d is None or d.is_main

    def inputs():
        tok = load_tokenizer(cfg.tokenizer or model_dir)
        model_cfg = LlamaConfig.from_json(model_dir)
        check_vocab(model_cfg.vocab_size, tok, model_dir, cfg.tokenizer or model_dir)
        kw = dict(max_len=cfg.max_len, fmt=cfg.fmt, qa_loss=cfg.qa_loss, cache_dir=cfg.cache_dir)
        forget = load_sets(cfg.forget, tok, role="forget", **kw)
        retain = load_sets(cfg.retain, tok, role="retain", **kw) if cfg.retain else None
        return tok, model_cfg, forget, retain
    tok, model_cfg, forget, retain = D.check_all(d, inputs)
    D.agree(d, "the data (forget / retain examples and tokens)",
            (len(forget), forget.num_tokens) + ((len(retain), retain.num_tokens) if retain is not None else ()))
    pad = tok.pad_id

    dtype = model_dtype(cfg.master_dtype)
    beta = cfg.effective_beta
    config_dict = asdict(cfg)

    def prepare(model):
        """LoRA swap (freezes the base) or the trainable set of full mode."""
        model.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.mode == "lora":
            # adapters in the master dtype (bf16: no fp32 copy anywhere)
            lora.apply_lora(model, targets=list(cfg.targets), r=cfg.rank, alpha=cfg.alpha,
                            dropout=cfg.lora_dropout, lora_dtype=dtype, seed=cfg.seed)
        else:
            train = set(quantized_linear_names(model)) if cfg.train == "linears" else None
            for n, p in model.named_parameters():
                p.requires_grad_(train is None or n in train)

    def frozen(model):
        for p in model.parameters():
            p.requires_grad_(False)

    def sharded(prep):
        return D.load_sharded_pretrained(d, lambda: Llama(model_cfg).to(dtype),
                                         lambda: Llama.from_pretrained(model_dir, dtype=dtype, device="cpu"),
                                         prep, cfg.precision, cfg.master_dtype)

    # NPO's reference log-probs: the model is the reference before any update (LoRA's B = 0).
    ref_logp = None
    if cfg.method == "npo" and resume:
        ref_logp = D.check_all(d, lambda: read_checkpoint_state(work)["extra"]["ref_logp"])
    if d is None:
        model = Llama.from_pretrained(model_dir, dtype=dtype, device=device)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.method == "npo" and ref_logp is None:
            ref_logp = sequence_logp_table(model, forget, cfg.eval_batch_size, pad, device, cfg.precision)
        prepare(model)
    else:
        model = sharded(prepare)
    if cfg.mode == "lora":
        ref_ctx = lambda: lora.disable_adapters(model)  # noqa: E731
        ref_model = model
    else:
        ref_ctx = contextlib.nullcontext
        ref_model = None
        if cfg.reg == "klr":  # a frozen copy (sharded like the model under torchrun)
            if d is None:
                ref_model = Llama.from_pretrained(model_dir, dtype=dtype, device=device)
                frozen(ref_model)
            else:
                ref_model = sharded(frozen)
            ref_model.eval()
    if cfg.method == "npo" and ref_logp is None:  # sharded: from the same sharded model, adapters off
        with ref_ctx():
            ref_logp = sequence_logp_table(model, forget, cfg.eval_batch_size, pad, device, cfg.precision, d)
    saliency = None
    if cfg.saliency_mask is not None:  # chosen once, at the starting weights; a resumed run reuses the choice
        saliency = (read_checkpoint_state(work)["extra"]["saliency"] if resume
                    else saliency_modules(model, cfg, forget, pad, device, ref_logp))
        sal.restrict_to(model, saliency["modules"])
    trainable, total = count_params(model)
    groups = relative_lr_groups(model, cfg.lr_relative, d) if cfg.lr_relative is not None else None
    probe = UpdateProbe(model, cfg.mode == "lora", d)

    step_fn = make_unlearn_step(model, method=cfg.method, reg=cfg.reg, beta=beta, delta=cfg.delta,
                                forget_weight=cfg.forget_weight, retain_weight=cfg.retain_weight,
                                ref_logp=ref_logp, ref_model=ref_model, ref_ctx=ref_ctx)

    evals = {"forget": forget.subset(fixed_sample(len(forget), cfg.eval_samples, cfg.seed))}
    if retain is not None:
        evals["retain"] = retain.subset(fixed_sample(len(retain), cfg.eval_samples, cfg.seed))
    loss_names = ("loss", "forget_loss", "retain_loss")
    fmts = cfg.quant_aware or []
    eval_extra = None
    if fmts:  # the seam, the combined loss and the monitoring (qru.train.quant_aware)
        base = qa.snapshot(model, cfg.qa_skip)  # the starting weights (LoRA: B = 0), also on resume
        step_fn = qa.quant_aware_step(step_fn, model, fmts, cfg.qa_weight, cfg.qa_sample, cfg.qa_block_size,
                                      cfg.qa_margin, cfg.qa_margin_weight, cfg.qa_margin_grad)
        loss_names += ("loss_q",) + (("qa_margin", "qa_gap") if cfg.qa_margin is not None else ())

        def qa_monitor() -> dict:
            nll_q = {}
            for fmt in fmts:
                with qa.fake_quantized(model, fmt, cfg.qa_block_size):
                    nll_q[fmt] = eval_nll(model, evals["forget"], cfg.eval_batch_size, pad, device, cfg.precision)
            return {"code_flip_frac": qa.code_flip_frac(base, model, fmts, cfg.qa_block_size, cfg.qa_skip),
                    "forget_nll_q": nll_q}
        eval_extra = qa_monitor
    aux = retain if cfg.reg != "none" else None
    info = {"mode": cfg.mode, "trainable_params": trainable, "total_params": total, "beta": beta,
            "forget_examples": len(forget), "retain_examples": len(retain) if retain is not None else 0,
            "device": str(device), "train": cfg.train if cfg.mode == "full" else "lora adapters",
            "trained_tensors": sorted(n for n, p in model.named_parameters() if p.requires_grad)
            if cfg.mode == "full" else None, "world_size": d.world if d is not None else 1}
    if groups is not None:
        info["group_lrs"] = {g["name"]: g["lr"] for g in groups}
    if fmts:
        info["quant_aware"] = {"formats": fmts, "weight": cfg.qa_weight, "sample": cfg.qa_sample,
                               "block_sizes": {f: resolve_block_size(f, cfg.qa_block_size) for f in fmts},
                               "skip": list(cfg.qa_skip), "targets": len(base)}
        if cfg.qa_margin is not None:
            info["quant_aware"]["margin"] = {"nats": cfg.qa_margin, "weight": cfg.qa_margin_weight,
                                               "grad": cfg.qa_margin_grad}
    if saliency is not None:
        info["saliency"] = saliency
    extra = {}
    if ref_logp is not None:
        extra["ref_logp"] = ref_logp
    if saliency is not None:
        extra["saliency"] = saliency
    if main_rank:
        print(f"qru unlearn: {cfg.method}+{cfg.reg} ({cfg.mode}) trainable params {trainable:,} / {total:,}"
              + (f", {d.world} processes ({d.backend}, FSDP2)" if d is not None else ""), file=sys.stderr)
    run_json = (lambda fields: write_run_json(work, "unlearn", cfg, fields)) if main_rank else (lambda fields: None)
    run_json({**info, "status": "running"})
    try:
        if fmts:  # parametrizations on the plain targets (the same Parameters; detached in `finally`)
            qa.attach(model, cfg.qa_skip)
        steps, total_steps, status, rows = train_loop(
            model, step_fn, forget, aux, evals, cfg, work, pad, device, loss_names,
            extra_state=extra or None, config_dict=config_dict,
            desc=f"unlearn {cfg.method}+{cfg.reg}", resume=resume, param_groups=groups, update_probe=probe,
            stop_check=stop_check, eval_extra=eval_extra, d=d)
    except KeyboardInterrupt:
        run_json({**info, "status": "interrupted"})
        raise
    except NonFiniteLossError as e:
        run_json({**info, "status": "failed", "error": str(e)})
        raise
    finally:
        if fmts:  # plain weights again (the same Parameters) for the output and the caller
            qa.detach(model)
    if status == "done":
        if cfg.mode == "lora":
            D.write_adapter(model, work, d, base_model_name_or_path=str(model_dir))
        else:
            D.write_model(model, work, d)
        if main_rank:
            tok.save_pretrained(work)
    secs = time.perf_counter() - t0
    warns = stall_warnings(rows, cfg.stall_threshold) if status == "done" else []
    run_json({**info, "status": status, "steps": steps, "total_steps": total_steps, "seconds": secs,
              "final": rows[-1], "warnings": warns})
    if status == "done" and main_rank:
        finish_run(work, out, cfg.keep_checkpoint)
    D.barrier(d)
    return TrainResult(out, status, steps, total_steps, trainable, total, rows, secs, model, warnings=warns)

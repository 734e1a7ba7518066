"""The training loop: unlearning (GA / NPO / SimNPO with GDR / KLR, full fine-tuning or LoRA)
and pre-training, written out by hand in one function, ``train_loop``.

Python API (the CLI is a thin wrapper): ``unlearn(UnlearnConfig) -> TrainResult`` and
``pretrain(PretrainConfig) -> TrainResult``.

One optimizer step = ``grad_accum`` micro-batches of the main set (forget set, or the training
set), each paired with the next retain batch (an independent, endlessly reshuffled stream). An
epoch is one pass over the main set; the last step of an epoch may use fewer micro-batches.

The reference model is never forwarded needlessly: NPO's reference sequence log-probs are computed
once for the whole forget set before the first step (the model *is* the reference then, in both
modes) and stored in the checkpoint; only KLR needs a per-batch reference forward (adapters
disabled in LoRA mode, a frozen copy loaded from the model directory in full mode).

Outputs in ``out``: ``metrics.jsonl`` (one row per logged step; eval rows carry ``forget_nll`` /
``retain_nll``), ``run.json``, the model (HF checkpoint, or a PEFT adapter in LoRA mode) and the
tokenizer files (``tokenizer.model``, or ``tokenizer.json`` and its configs).

Commit protocol (:mod:`qru.io`): the run holds the lock ``.OUT.lock`` and works in ``.OUT.run/``
beside ``out`` (:func:`work_dir`); only a finished run is committed to ``out``, with one atomic
rename, so a previous ``out`` (which needs ``overwrite=True``) stays intact until then. While a run
is unfinished the work directory holds ``checkpoint-<step>/`` directories (every ``save_every``
steps, at ``stop_after`` and on Ctrl-C), each committed atomically with a ``COMPLETE`` marker written
last; the last two complete ones are kept. ``resume=True`` continues from the newest complete one
bit-identically (trainable parameters, AdamW state, step, data positions, RNG states); incomplete
ones are ignored, and a run killed before its first checkpoint restarts from step 0. A new run
(no ``resume``) discards an unfinished run that has a checkpoint only with ``overwrite=True``.
``keep_checkpoint=True`` carries the checkpoints into ``out``.

``metrics.jsonl`` is only ever appended to: after a resume it may hold rows of the interrupted run
past the resumed checkpoint, so a reader that wants the rows up to a step dedupes by ``step``,
keeping the last occurrence (:func:`read_metrics`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from qru.io import (append_text, check_device, check_output, clean_stale, clean_stale_in, commit_dir, fault_point,
                    staged_dir, target_lock, write_json, write_text)
from qru.kernels.dense import dense_linears
from qru.model.checkpoint import write_pretrained
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.model.tokenizer import Tokenizer, load_tokenizer
from qru.quant.qlinear import split_linears
from qru.train import losses as L
from qru.train.data import (Batch, BatchStream, TokenizedSet, collate, detect_format, fixed_sample, format_qa,
                            load_sets, read_records)

METHODS = ("ga", "npo", "simnpo")
REGS = ("none", "gdr", "klr")
MODES = ("full", "lora")
SCHEDULERS = ("constant", "cosine")
PRECISIONS = ("bf16", "fp32")
MASTER_DTYPES = ("fp32", "bf16")
TRAIN_SETS = ("all", "linears")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CKPT_PREFIX = "checkpoint-"
COMPLETE = "COMPLETE"
KEEP_CHECKPOINTS = 2
# Training batches are padded to a multiple of this many tokens: a bounded set of GEMM shapes
# (oneDNN caches a primitive, ~0.7 MB, per new shape; see qru.train.losses.padded_rows).
PAD_MULTIPLE = 16
METRICS = "metrics.jsonl"
RUN_JSON = "run.json"
TOKENIZER_FILE = "tokenizer.model"  # the file pretrain --train-tokenizer writes
# Options that may differ between a run and its resumption.
_RESUME_FREE = {"resume", "stop_after", "progress", "save_every", "log_every", "keep_checkpoint", "cache_dir",
                "device", "overwrite"}


class TrainConfigError(ValueError):
    """An invalid training option. The message names the option."""


class NonFiniteLossError(ValueError):
    """A loss term or a gradient became NaN or Inf; raised before the optimizer applies it.
    The message names the step and the loss term or parameter."""


# -- configs ------------------------------------------------------------------------------

@dataclass(kw_only=True)
class TrainOptions:
    """Options shared by pre-training and unlearning."""
    out: str
    lr: float = 1e-5
    epochs: int = 5
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 256
    scheduler: str = "constant"  # "constant" | "cosine" (after linear warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    precision: str = "bf16"  # autocast dtype of the compute: "bf16" | "fp32" (no autocast)
    master_dtype: str = "fp32"  # "fp32" weights (+ fp32 optimizer state) | "bf16" (no fp32 master copy)
    gradient_checkpointing: bool = False
    device: str = "auto"
    fmt: str = "auto"  # data format: "auto" | "text" | "qa"
    eval_samples: int = 32  # size of the held-fixed eval samples
    eval_batch_size: int = 16
    log_every: int = 1
    save_every: int = 0  # checkpoint every N steps (0: only at stop_after / Ctrl-C)
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps, as if interrupted
    keep_checkpoint: bool = False  # keep the ``checkpoint-<step>/`` directories in a finished output
    overwrite: bool = False  # replace an existing non-empty ``out`` (committed only when the run finishes)
    progress: bool = True
    cache_dir: str | None = None  # token cache (default $QRU_CACHE/tokens or ~/.cache/qru/tokens)


STALL_THRESHOLD = 0.05


@dataclass(kw_only=True)
class UnlearnConfig(TrainOptions):
    """Unlearning options (``qru unlearn``).

    ``train`` (full mode): ``"all"`` trains every parameter; ``"linears"`` trains exactly the
    matrices 4-bit export quantizes with its default skip (:func:`quantized_linear_names`: the seven
    linears of every layer), with embeddings, norms and ``lm_head`` frozen. At 7B the embeddings
    and head are about 4% of the weights, in a small model 30-60%, and 4-bit never rounds them, so
    ``all`` lets a large, unrounded share of the update through quantization.

    ``master_dtype="bf16"`` is pure bf16 training (Zhang et al.'s Trainer setup): the weights are
    bf16 and AdamW's ``exp_avg`` / ``exp_avg_sq`` are bf16 too (torch allocates the state like the
    parameter; the fused kernel computes each update in fp32 registers and rounds it back to bf16);
    no fp32 master copy exists anywhere. Two consequences: an update smaller than half a bf16 ulp
    of a weight (2^-9 relative) is rounded away, so most small steps change nothing; and the
    second-moment decay ``v * 0.999`` is a no-op whenever ``0.001 * v`` is below half an ulp of
    ``v`` (always, for a normal bf16 ``v``: 0.001 < 2^-9), so ``exp_avg_sq`` only grows (or stays)
    and never decays while gradients shrink; e.g. ``v = 1.0``: ``0.999`` rounds back to ``1.0``.
    ``exp_avg`` (x 0.9) still decays. ``master_dtype="fp32"`` keeps fp32 weights and state.

    ``lr_relative`` = X sets one AdamW param group per trainable tensor with lr = X * std(W)
    (X * RMS(w) for a vector, whose std may be 0). Derivation: Adam's update per step has
    magnitude about lr per entry (the normalised gradient m / sqrt(v) is O(1)), so a step changes a
    matrix by about lr / std(W) relative to its entries. A 7B model's weights have std about
    0.01-0.02 and is unlearned at lr 1e-5, a relative update of about 5e-4 to 1e-3 per step. A small
    model's weights have another std, so the same absolute lr is another relative step (and under
    bf16 storage, whose ulp is 2^-8 relative, a step below half an ulp rounds away). X = lr_7B /
    std_7B, about 1e-5 / 0.015 ~ 7e-4, reproduces a 7B update's relative size at any width.

    ``stall_threshold`` (nats): the run summary (``run.json`` ``warnings``, the CLI) warns when the
    forget NLL (or, without eval rows, the forget loss) moved by less than this, naming the levers.
    """
    model: str
    forget: list[str]
    retain: list[str] = field(default_factory=list)
    method: str = "npo"
    reg: str = "gdr"
    mode: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    beta: float | None = None  # None: 0.1 for NPO, 2.5 for SimNPO
    delta: float = L.SIMNPO_DELTA
    forget_weight: float = 1.0  # gamma
    retain_weight: float = 1.0  # alpha
    tokenizer: str | None = None  # default: the tokenizer beside the model (tokenizer.json or tokenizer.model)
    qa_loss: str = "answer"
    train: str = "all"  # full mode: "all" parameters | "linears" (only what 4-bit export quantizes)
    lr_relative: float | None = None  # full mode: lr = lr_relative * std(W) per matrix (``lr`` is then unused)
    stall_threshold: float = STALL_THRESHOLD  # warn when forget loss / NLL moved less than this (relative)

    @property
    def effective_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return L.SIMNPO_BETA if self.method == "simnpo" else L.NPO_BETA


@dataclass(kw_only=True)
class PretrainConfig(TrainOptions):
    data: list[str]
    config: str = "tiny"  # preset name or a config.json path
    tokenizer: str | None = None  # tokenizer.json / tokenizer.model file or a directory holding one
    train_tokenizer: int | None = None  # train a BPE tokenizer of this vocab size on the data
    init: str | None = None  # fine-tune this checkpoint instead of training from scratch
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 16
    scheduler: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.01
    qa_loss: str = "all"


@dataclass
class TrainResult:
    out: Path
    status: str  # "done" | "stopped"
    steps: int
    total_steps: int
    trainable_params: int
    total_params: int
    metrics: list[dict]  # every row of metrics.jsonl
    seconds: float
    model: torch.nn.Module = field(repr=False, default=None)
    warnings: list[str] = field(default_factory=list)  # e.g. "nothing happened" (:func:`stall_warnings`)

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.metrics if any(k.endswith("_nll") for k in r)]


def _check(cond: bool, name: str, value, need: str) -> None:
    if not cond:
        raise TrainConfigError(f"{name} must be {need}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_common(c: TrainOptions) -> None:
    _check(isinstance(c.lr, (int, float)) and math.isfinite(c.lr) and c.lr > 0, "lr", c.lr, "a positive number")
    for name in ("epochs", "batch_size", "grad_accum", "eval_samples", "eval_batch_size", "log_every"):
        v = getattr(c, name)
        _check(_is_int(v) and v > 0, name, v, "a positive integer")
    _check(_is_int(c.max_len) and c.max_len >= 2, "max_len", c.max_len, "an integer >= 2")
    for name in ("warmup_steps", "save_every", "seed"):
        v = getattr(c, name)
        _check(_is_int(v) and v >= 0, name, v, "a non-negative integer")
    _check(c.stop_after is None or (_is_int(c.stop_after) and c.stop_after > 0), "stop_after", c.stop_after,
           "None or a positive integer")
    _check(c.weight_decay >= 0, "weight_decay", c.weight_decay, ">= 0")
    _check(c.max_grad_norm >= 0, "max_grad_norm", c.max_grad_norm, ">= 0")
    _check(c.scheduler in SCHEDULERS, "scheduler", c.scheduler, f"one of {SCHEDULERS}")
    _check(c.precision in PRECISIONS, "precision", c.precision, f"one of {PRECISIONS}")
    _check(c.master_dtype in MASTER_DTYPES, "master_dtype", c.master_dtype, f"one of {MASTER_DTYPES}")
    _check(c.fmt in ("auto", "text", "qa"), "fmt", c.fmt, "one of ('auto', 'text', 'qa')")
    _check(c.qa_loss in ("answer", "all"), "qa_loss", c.qa_loss, "one of ('answer', 'all')")
    _check(bool(c.out), "out", c.out, "an output directory")
    check_device(c.device)


def validate_unlearn(c: UnlearnConfig) -> None:
    _validate_common(c)
    _check(c.method in METHODS, "method", c.method, f"one of {METHODS}")
    _check(c.reg in REGS, "reg", c.reg, f"one of {REGS}")
    _check(c.mode in MODES, "mode", c.mode, f"one of {MODES}")
    _check(_is_int(c.rank) and c.rank > 0, "rank", c.rank, "a positive integer")
    _check(c.alpha > 0, "alpha", c.alpha, "> 0")
    _check(0 <= c.lora_dropout < 1, "lora_dropout", c.lora_dropout, "in [0, 1)")
    _check(bool(c.targets), "targets", c.targets, "a non-empty list of module names")
    _check(c.beta is None or (math.isfinite(c.beta) and c.beta > 0), "beta", c.beta, "None or > 0")
    _check(math.isfinite(c.delta), "delta", c.delta, "a finite number")
    _check(math.isfinite(c.forget_weight) and c.forget_weight >= 0, "forget_weight", c.forget_weight,
           "a finite number >= 0")
    _check(math.isfinite(c.retain_weight) and c.retain_weight >= 0, "retain_weight", c.retain_weight,
           "a finite number >= 0")
    _check(c.train in TRAIN_SETS, "train", c.train, f"one of {TRAIN_SETS}")
    _check(c.lr_relative is None or (isinstance(c.lr_relative, (int, float)) and math.isfinite(c.lr_relative)
                                     and c.lr_relative > 0), "lr_relative", c.lr_relative, "None or > 0")
    _check(c.lr_relative is None or c.mode == "full", "lr_relative", c.lr_relative,
           "None in LoRA mode (it scales the lr by each trained weight's std: full mode only)")
    _check(isinstance(c.stall_threshold, (int, float)) and c.stall_threshold >= 0, "stall_threshold",
           c.stall_threshold, ">= 0")
    if isinstance(c.forget, (str, os.PathLike)):
        c.forget = [str(c.forget)]
    if isinstance(c.retain, (str, os.PathLike)):
        c.retain = [str(c.retain)]
    _check(bool(c.forget), "forget", c.forget, "at least one data path")
    if c.reg != "none" and not c.retain:
        raise TrainConfigError(f"reg={c.reg!r} needs retain data (retain is empty)")


def validate_pretrain(c: PretrainConfig) -> None:
    _validate_common(c)
    if isinstance(c.data, (str, os.PathLike)):
        c.data = [str(c.data)]
    _check(bool(c.data), "data", c.data, "at least one data path")
    _check(c.train_tokenizer is None or (_is_int(c.train_tokenizer) and c.train_tokenizer > 0), "train_tokenizer",
           c.train_tokenizer, "None or a positive vocabulary size")
    given = [n for n in ("tokenizer", "train_tokenizer") if getattr(c, n) is not None]
    if len(given) > 1:
        raise TrainConfigError("give only one of tokenizer and train_tokenizer")
    if c.init is None:  # a bad config fails before a tokenizer is trained
        p = Path(c.config)
        if p.suffix == ".json" or p.is_dir():
            LlamaConfig.from_json(p)
        else:
            LlamaConfig.preset(c.config)


# -- small helpers ------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    return check_device(name, option="device")


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def lr_at(step: int, total: int, base: float, scheduler: str, warmup: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine to 0."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if scheduler == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def check_vocab(model_vocab: int, tok: Tokenizer, model_src, tok_src) -> None:
    if tok.vocab_size > model_vocab:
        raise TrainConfigError(
            f"vocabulary mismatch: tokenizer {tok_src} has {tok.vocab_size} pieces but the model {model_src} has "
            f"vocab_size={model_vocab}; use the tokenizer the model was trained with")
    if tok.vocab_size < model_vocab:
        warnings.warn(f"model {model_src} has vocab_size={model_vocab} > tokenizer {tok_src} ({tok.vocab_size} "
                      "pieces); the extra embedding rows are unused")


def versions() -> dict:
    import qru

    v = {"qru": qru.__version__, "torch": torch.__version__, "python": platform.python_version(),
         "platform": platform.platform()}
    from importlib import metadata

    for dist in ("transformers", "peft", "datasets", "sentencepiece", "safetensors", "triton"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return v


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


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


def model_sequence_logprobs(model, input_ids: torch.Tensor, loss_mask: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``(sum of target log-probs, target count)`` of a causal LM on a batch.

    qru's :class:`Llama` with a plain bias-free ``lm_head`` goes through the fused, chunked head
    (:func:`qru.train.losses.hidden_sequence_logprobs`: no (B, T, V) logits, only target positions
    projected); any other model through its logits and :func:`qru.train.losses.sequence_logprobs`.
    """
    head = getattr(model, "lm_head", None)
    if isinstance(model, Llama) and type(head) is torch.nn.Linear and head.bias is None:
        hidden = model(input_ids, return_hidden=True)
        return L.hidden_sequence_logprobs(hidden, head.weight, input_ids, loss_mask)
    return L.sequence_logprobs(model(input_ids), input_ids, loss_mask)


def _batches(ts: TokenizedSet, bs: int):
    for s in range(0, len(ts), bs):
        yield list(range(s, min(s + bs, len(ts))))


@torch.no_grad()
def eval_nll(model, ts: TokenizedSet, batch_size: int, pad_id: int, device, precision: str) -> float:
    """Plain mean token NLL over the targets of ``ts`` (model in eval mode, no gradient)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0.0
    for idx in _batches(ts, batch_size):
        b = collate(ts, idx, pad_id).to(device)
        with autocast(device, precision):
            s, c = model_sequence_logprobs(model, b.input_ids, b.loss_mask)
        tot -= float(s.sum())
        n += float(c.sum())
    model.train(was)
    return tot / n


@torch.no_grad()
def sequence_logp_table(model, ts: TokenizedSet, batch_size: int, pad_id: int, device, precision: str
                        ) -> torch.Tensor:
    """Per-example sequence log-probs (sum over targets) of every example of ``ts``, fp32 on CPU."""
    was = model.training
    model.eval()
    out = torch.empty(len(ts), dtype=torch.float32)
    for idx in _batches(ts, batch_size):
        b = collate(ts, idx, pad_id).to(device)
        with autocast(device, precision):
            out[idx] = model_sequence_logprobs(model, b.input_ids, b.loss_mask)[0].cpu()
    model.train(was)
    return out


# -- checkpoints ----------------------------------------------------------------------------

def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _trainable_named(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def work_dir(out: str | os.PathLike) -> Path:
    """Where a run into ``out`` trains until it commits: ``.OUT.run`` beside ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}.run"


def _ckpt_step(p: Path) -> int | None:
    tail = p.name[len(CKPT_PREFIX):]
    return int(tail) if p.name.startswith(CKPT_PREFIX) and tail.isdigit() else None


def _is_complete(p: Path) -> bool:
    try:
        info = json.loads((p / COMPLETE).read_text())
        return all((p / f).is_file() and (p / f).stat().st_size == n for f, n in info["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete ``checkpoint-<step>/`` directories of ``run_dir``, oldest first (incomplete ones,
    without a valid ``COMPLETE`` marker, are left out)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(_ckpt_step(p), p) for p in run_dir.iterdir() if p.is_dir() and _ckpt_step(p) is not None]
    return [p for _, p in sorted(found) if _is_complete(p)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    ck = list_checkpoints(run_dir)
    return ck[-1] if ck else None


def save_checkpoint(run_dir: Path, model, optimizer, state: dict) -> Path:
    """Write ``run_dir/checkpoint-<step>``: trainable tensors, optimizer, loop state (step, data
    positions, RNG, extras), and the ``COMPLETE`` marker last, committed with one rename. Then keep
    only the newest ``KEEP_CHECKPOINTS`` complete checkpoints."""
    run_dir = Path(run_dir)
    ckpt = run_dir / f"{CKPT_PREFIX}{int(state['step'])}"
    with staged_dir(ckpt, lock=False) as stage:  # the run holds the output's lock
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable_named(model).items()},
                  str(stage / "trainable.safetensors"))
        fault_point(f"checkpoint tensors {ckpt}")
        torch.save(optimizer.state_dict(), stage / "optimizer.pt")
        fault_point(f"checkpoint optimizer {ckpt}")
        torch.save({**state, "rng": _rng_state()}, stage / "state.pt")
        files = {f.name: f.stat().st_size for f in stage.iterdir()}
        write_json(stage / COMPLETE, {"step": int(state["step"]), "files": files})
    keep = list_checkpoints(run_dir)[-KEEP_CHECKPOINTS:]
    for p in run_dir.iterdir():
        if p.is_dir() and _ckpt_step(p) is not None and p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return ckpt


def _drop_checkpoints(run_dir: Path) -> None:
    for p in Path(run_dir).iterdir():
        if p.is_dir() and _ckpt_step(p) is not None:
            shutil.rmtree(p, ignore_errors=True)


def _need_checkpoint(run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"resume: no checkpoint: {run_dir} holds no complete {CKPT_PREFIX}<step> "
                                "directory (run without resume first)")
    return ckpt


def read_checkpoint_state(run_dir: Path) -> dict:
    """The loop state of the newest complete checkpoint in ``run_dir``."""
    return torch.load(_need_checkpoint(Path(run_dir)) / "state.pt", map_location="cpu", weights_only=True)


def load_checkpoint(run_dir: Path, model, optimizer) -> dict:
    """Restore the trainable parameters and optimizer from the newest complete checkpoint in
    ``run_dir``; returns its loop state."""
    ckpt = _need_checkpoint(Path(run_dir))
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    saved = load_file(str(ckpt / "trainable.safetensors"))
    params = _trainable_named(model)
    if saved.keys() != params.keys():
        diff = sorted(saved.keys() ^ params.keys())
        raise TrainConfigError(f"resume: checkpoint {ckpt} does not match the model's trainable parameters "
                               f"(differ: {diff[:5]})")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape or saved[n].dtype != p.dtype:
                raise TrainConfigError(f"resume: {ckpt}: tensor {n!r} is {saved[n].dtype}{tuple(saved[n].shape)}, "
                                       f"the model has {p.dtype}{tuple(p.shape)}")
            p.copy_(saved[n])
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    return state


def _check_resume_config(saved: dict, current: dict) -> None:
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in _RESUME_FREE and saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:5])
        raise TrainConfigError(f"resume: options differ from the checkpointed run ({detail})")


class _SigintGuard:
    """First Ctrl-C sets a flag the loop checks after each step (it then checkpoints and stops);
    a second one interrupts at once."""

    def __init__(self):
        self.hit = False
        self._old = None

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        print("\nqru: Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: no handler, plain KeyboardInterrupt semantics
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _append_metrics(path: Path, rows: list[dict]) -> None:
    append_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: str | os.PathLike, up_to: int | None = None) -> list[dict]:
    """The rows of a ``metrics.jsonl`` by step: an append-only log in which a resumed run repeats the
    steps after its checkpoint, so rows are deduplicated by ``step`` keeping the last occurrence
    (``up_to``: only steps <= it). A torn line (a kill mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if up_to is None or step <= up_to:
            by_step[step] = row
    return [by_step[k] for k in sorted(by_step)]


# -- the loop ------------------------------------------------------------------------------

StepFn = Callable[[Batch, "Batch | None"], dict]


def check_finite_losses(losses: dict, names: tuple[str, ...], step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the term(s) if a loss scalar is NaN/Inf (one sync)."""
    present = [k for k in names if losses.get(k) is not None]
    vals = torch.stack([losses[k].detach().float().reshape(()) for k in present])
    if bool(torch.isfinite(vals).all()):
        return
    # the loss terms first, then the total they add up to
    bad = [f"{k} = {float(v)}" for k, v in sorted(zip(present, vals.tolist()), key=lambda kv: kv[0] == "loss")
           if not math.isfinite(v)]
    raise NonFiniteLossError(f"training diverged at step {step}: {', '.join(bad)}; stopped before the optimizer "
                             "step (lower the learning rate or check the loss options)")


def check_finite_grads(named: dict[int, str], params: list[torch.nn.Parameter], max_norm: float, step: int) -> None:
    """Clip the gradients to ``max_norm`` (0: no clipping) as ``clip_grad_norm_`` does, after checking
    their total norm (one sync); raise :class:`NonFiniteLossError` naming the first parameter with a
    NaN/Inf gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norm = torch.nn.utils.get_total_norm(grads)
    if bool(torch.isfinite(norm)):
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return
    for p in params:  # failure path only: find the culprit
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            bad = int((~torch.isfinite(p.grad)).sum())
            raise NonFiniteLossError(f"training diverged at step {step}: gradient of {named[id(p)]} has {bad} "
                                     "non-finite value(s) (NaN or Inf); stopped before the optimizer step")
    raise NonFiniteLossError(f"training diverged at step {step}: the gradient norm overflows ({float(norm)}); "
                             "stopped before the optimizer step")


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW, torch's fused single-pass kernel where it applies (floating params on CPU or CUDA;
    what HF's Trainer defaults to on torch >= 2.8), else the multi-tensor one. Same update rule.
    ``groups`` (param groups over exactly ``params``) replaces the single group at ``lr``. Its
    state (``exp_avg``, ``exp_avg_sq``) has each parameter's dtype: bf16 parameters get bf16 state."""
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups if groups is not None else params, lr=lr, weight_decay=weight_decay,
                             fused=fused)


def train_loop(model: torch.nn.Module, step_fn: StepFn, main: TokenizedSet, aux: TokenizedSet | None,
               evals: dict[str, TokenizedSet], opts: TrainOptions, out: Path, pad_id: int,
               device: torch.device, loss_names: tuple[str, ...], extra_state: dict | None = None,
               config_dict: dict | None = None, desc: str = "train", resume: bool | None = None,
               param_groups: list[dict] | None = None, update_probe: Callable[[], dict] | None = None,
               stop_check: Callable[[torch.nn.Module], dict] | None = None
               ) -> tuple[int, int, str, list[dict]]:
    """Run the optimisation in the run directory ``out`` (``metrics.jsonl`` appended, checkpoints).
    ``step_fn(main_batch, aux_batch)`` returns a dict of scalar losses with ``"loss"`` (the one
    differentiated) and the other ``loss_names``. ``resume`` (default ``opts.resume``): continue from
    the newest complete checkpoint in ``out``. Returns ``(steps_done, total_steps, status,
    metrics_rows)``; status is ``"done"`` or ``"stopped"``. Raises KeyboardInterrupt after
    checkpointing on Ctrl-C. ``param_groups``: AdamW groups of the trainable parameters, each with
    its peak lr as ``base_lr`` (default: one group at ``opts.lr``). ``update_probe() -> dict``: logged
    as ``update`` in every eval row (:class:`UpdateProbe`). ``stop_check(model) -> dict``: called
    after every eval row but the first (end of each epoch); its dict is logged in the row as ``check``,
    and ``{"stop": True, ...}`` ends the run there (status ``"done"``, fewer steps than planned)."""
    resume = opts.resume if resume is None else resume
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainConfigError("no trainable parameters")
    optimizer = make_optimizer(params, opts.lr, opts.weight_decay, groups=param_groups)
    param_names = {id(p): n for n, p in model.named_parameters()}
    stream = BatchStream(len(main), opts.batch_size, opts.seed)
    aux_stream = BatchStream(len(aux), opts.batch_size, opts.seed + 1) if aux is not None else None
    nb = stream.batches_per_epoch
    steps_per_epoch = -(-nb // opts.grad_accum)
    total = steps_per_epoch * opts.epochs
    metrics_path = out / METRICS
    config_dict = config_dict or {}

    def run_evals() -> dict:
        out = {f"{k}_nll": eval_nll(model, v, opts.eval_batch_size, pad_id, device, opts.precision)
               for k, v in evals.items()}
        if update_probe is not None:
            out["update"] = update_probe()
        return out

    step = 0
    if resume:
        state = load_checkpoint(out, model, optimizer)
        _check_resume_config(state.get("config", {}), config_dict)
        step = int(state["step"])
        stream.load_state_dict(state["stream"])
        if aux_stream is not None:
            aux_stream.load_state_dict(state["aux_stream"])
        _set_rng_state(state["rng"])
        rows = read_metrics(metrics_path, up_to=step)
    else:
        empty = {k: None for k in loss_names}
        rows = [{"step": 0, "epoch": 0.0, **empty, "lr": lr_at(0, total, opts.lr, opts.scheduler, opts.warmup_steps),
                 "tokens_per_s": None, **run_evals()}]
        _append_metrics(metrics_path, rows)

    def checkpoint():
        save_checkpoint(out, model, optimizer, {
            "step": step, "stream": stream.state_dict(),
            "aux_stream": aux_stream.state_dict() if aux_stream is not None else None,
            "config": config_dict, "extra": extra_state or {}})

    model.train()
    status = "done"
    acc: dict = {}
    n_acc, tokens, t_log = 0, 0, time.perf_counter()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(total=total, initial=step, desc=desc, disable=not opts.progress or tqdm is None, dynamic_ncols=True,
               file=sys.stderr) if tqdm else None
    with _SigintGuard() as guard, (bar if bar is not None else contextlib.nullcontext()), _dense_gemms(model):
        while step < total:
            in_epoch = step % steps_per_epoch
            n_micro = min(opts.grad_accum, nb - in_epoch * opts.grad_accum)
            lr = lr_at(step, total, opts.lr, opts.scheduler, opts.warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total, g["base_lr"], opts.scheduler, opts.warmup_steps) if "base_lr" in g else lr
            for _ in range(n_micro):
                mb = collate(main, stream.next(), pad_id, PAD_MULTIPLE)
                ab = collate(aux, aux_stream.next(), pad_id, PAD_MULTIPLE) if aux_stream is not None else None
                tokens += mb.num_tokens + (ab.num_tokens if ab is not None else 0)
                with autocast(device, opts.precision):
                    losses = step_fn(mb.to(device), ab.to(device) if ab is not None else None)
                check_finite_losses(losses, loss_names, step + 1)
                (losses["loss"] / n_micro).backward()
                for k in loss_names:
                    if losses.get(k) is not None:
                        acc[k] = acc.get(k, 0.0) + losses[k].detach().float() / n_micro
                del losses
            check_finite_grads(param_names, params, opts.max_grad_norm, step + 1)  # and clips
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_acc += 1
            end_of_epoch = step % steps_per_epoch == 0
            if step % opts.log_every == 0 or end_of_epoch or step == total:
                now = time.perf_counter()
                row = {"step": step, "epoch": round(step / steps_per_epoch, 6),
                       **{k: float(acc[k]) / n_acc if k in acc else None for k in loss_names}, "lr": lr,
                       "tokens_per_s": tokens / max(now - t_log, 1e-9)}
                stop_now = False
                if end_of_epoch:
                    row.update(run_evals())
                    if stop_check is not None:
                        row["check"] = stop_check(model)
                        model.train()
                        stop_now = bool(row["check"].get("stop"))
                rows.append(row)
                _append_metrics(metrics_path, [row])
                if bar is not None:
                    bar.set_postfix({k: f"{row[k]:.3f}" for k in loss_names if row[k] is not None}
                                    | {"tok/s": f"{row['tokens_per_s']:.0f}"}, refresh=False)
                acc = {}
                n_acc, tokens, t_log = 0, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            if end_of_epoch and stop_now:
                break
            if step < total and (guard.hit or (opts.save_every and step % opts.save_every == 0)
                                 or (opts.stop_after and step >= opts.stop_after)):
                checkpoint()
                if guard.hit:
                    msg = (f"interrupted at step {step}/{total}; checkpoint in {out / f'{CKPT_PREFIX}{step}'} "
                           "(continue with resume)")
                    print(f"qru: {msg}", file=sys.stderr)
                    raise KeyboardInterrupt(msg)
                if opts.stop_after and step >= opts.stop_after:
                    status = "stopped"
                    break
    if status == "done":  # a finite last step can still leave an Inf weight: never save one as finished
        for n, p in model.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                raise NonFiniteLossError(f"training diverged at step {step}: parameter {n} has non-finite value(s) "
                                         "after the optimizer step; the model is not saved")
    return step, total, status, rows


# -- shared set-up ---------------------------------------------------------------------------

def _model_dtype(master_dtype: str) -> torch.dtype:
    return torch.bfloat16 if master_dtype == "bf16" else torch.float32


def _write_run_json(run_dir: Path, command: str, cfg, extra: dict) -> None:
    write_text(run_dir / RUN_JSON, json.dumps({"command": command, "config": asdict(cfg), "seed": cfg.seed,
                                               "versions": versions(), **extra}, indent=2, default=str) + "\n")


def _prepare_work(out: Path, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """The run directory of ``out`` (the caller holds the lock), and whether there is a checkpoint to
    resume from. Stale stages of dead runs are removed; an unfinished run is kept for ``resume`` and
    discarded by a new run only with ``overwrite``."""
    clean_stale(out)
    work = work_dir(out)
    clean_stale_in(work)  # stages / temp files of a killed run (it is dead: we hold the lock)
    ckpt = latest_checkpoint(work)
    if resume:
        if not work.is_dir():
            raise FileNotFoundError(f"resume: no checkpoint: no unfinished run of {out} ({work} does not exist); "
                                    "run without resume first")
        if ckpt is not None:
            return work, True
        warnings.warn(f"resume: {work} holds no complete checkpoint (the run was stopped before its first one); "
                      "starting from step 0")
    elif ckpt is not None and not overwrite:
        raise TrainConfigError(f"{out} has an unfinished run in {work} ({ckpt.name}); continue it with resume "
                               "(--resume) or pass overwrite (--overwrite) to discard it")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work, False


def _finish(work: Path, out: Path, keep_checkpoint: bool) -> None:
    """Commit the finished run: ``work`` becomes ``out`` in one rename (the old ``out`` is removed after)."""
    if not keep_checkpoint:
        _drop_checkpoints(work)
    clean_stale_in(work)
    commit_dir(work, out)


def _lora():
    from qru.model import lora

    return lora


def _dense_gemms(*models) -> contextlib.ExitStack:
    """The models' plain fp32 CPU linears run their GEMMs through oneDNN (``qru.kernels.dense``) for
    the forward passes of a step (the backward follows the recorded graph). ``train_loop`` also holds
    it around the whole loop, so a gradient-checkpointing recomputation takes the same path."""
    stack = contextlib.ExitStack()
    seen = set()
    for m in models:
        if m is not None and id(m) not in seen:
            seen.add(id(m))
            stack.enter_context(dense_linears(m))
    return stack


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
        with _dense_gemms(model, ref_model):
            return _step(fb, rb)

    def _step(fb: Batch, rb: Batch | None) -> dict:
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
        work, resume = _prepare_work(out, cfg.resume, cfg.overwrite)
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

    dtype = _model_dtype(cfg.master_dtype)
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
    _write_run_json(work, "unlearn", cfg, {**info, "status": "running"})
    try:
        steps, total_steps, status, rows = train_loop(
            model, step_fn, forget, aux, evals, cfg, work, pad, device, ("loss", "forget_loss", "retain_loss"),
            extra_state={"ref_logp": ref_logp} if ref_logp is not None else None, config_dict=config_dict,
            desc=f"unlearn {cfg.method}+{cfg.reg}", resume=resume, param_groups=groups, update_probe=probe,
            stop_check=stop_check)
    except KeyboardInterrupt:
        _write_run_json(work, "unlearn", cfg, {**info, "status": "interrupted"})
        raise
    except NonFiniteLossError as e:
        _write_run_json(work, "unlearn", cfg, {**info, "status": "failed", "error": str(e)})
        raise
    if status == "done":
        if cfg.mode == "lora":
            _lora().write_adapter(model, work, base_model_name_or_path=str(model_dir))
        else:
            write_pretrained(model, work)
        tok.save_pretrained(work)
    secs = time.perf_counter() - t0
    warns = stall_warnings(rows, cfg.stall_threshold) if status == "done" else []
    _write_run_json(work, "unlearn", cfg, {**info, "status": status, "steps": steps, "total_steps": total_steps,
                                           "seconds": secs, "final": rows[-1], "warnings": warns})
    if status == "done":
        _finish(work, out, cfg.keep_checkpoint)
    return TrainResult(out, status, steps, total_steps, trainable, total, rows, secs, model, warnings=warns)


# -- pre-training --------------------------------------------------------------------------

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
        work, resume = _prepare_work(out, cfg.resume, cfg.overwrite)
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
    dtype = _model_dtype(cfg.master_dtype)
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
        with _dense_gemms(model):
            return {"loss": L.mean_nll(*model_sequence_logprobs(model, b.input_ids, b.loss_mask))}

    evals = {"train": data.subset(fixed_sample(len(data), cfg.eval_samples, cfg.seed))}
    info = {"trainable_params": trainable, "total_params": total, "examples": len(data),
            "tokens": data.num_tokens, "device": str(device)}
    _write_run_json(work, "pretrain", cfg, {**info, "status": "running"})
    try:
        steps, total_steps, status, rows = train_loop(model, step_fn, data, None, evals, cfg, work, tok.pad_id,
                                                      device, ("loss",), config_dict=asdict(cfg), desc="pretrain",
                                                      resume=resume, stop_check=stop_check)
    except KeyboardInterrupt:
        _write_run_json(work, "pretrain", cfg, {**info, "status": "interrupted"})
        raise
    except NonFiniteLossError as e:
        _write_run_json(work, "pretrain", cfg, {**info, "status": "failed", "error": str(e)})
        raise
    if status == "done":
        write_pretrained(model, work)
        tok.save_pretrained(work)
    secs = time.perf_counter() - t0
    _write_run_json(work, "pretrain", cfg, {**info, "status": status, "steps": steps, "total_steps": total_steps,
                                            "seconds": secs, "final": rows[-1]})
    if status == "done":
        _finish(work, out, cfg.keep_checkpoint)
    return TrainResult(out, status, steps, total_steps, trainable, total, rows, secs, model)

"""Run configs of training: the options shared by pre-training and unlearning (``TrainOptions``),
``UnlearnConfig``, ``PretrainConfig``, their validation (a bad option raises
:class:`TrainConfigError` naming it, before any expensive work) and the ``TrainResult`` a run returns.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qru.io import check_device
from qru.kernels.threads import check_threads
from qru.model.config import LlamaConfig
from qru.model.lora import TARGETS
from qru.model.tokenizer import Tokenizer
from qru.quant.qlinear import resolve_block_size
from qru.train import losses as L
from qru.train import quant_aware as qa

METHODS = ("ga", "npo", "simnpo")
REGS = ("none", "gdr", "klr")
MODES = ("full", "lora")
SCHEDULERS = ("constant", "cosine")
PRECISIONS = ("bf16", "fp32")
MASTER_DTYPES = ("fp32", "bf16")
TRAIN_SETS = ("all", "linears")


class TrainConfigError(ValueError):
    """An invalid training option. The message names the option."""



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
    # CPU threads: None keeps torch's count; N sets it; "adaptive": each step on the cores free of
    # other jobs at its start, at most torch's count (fast on a shared machine; results then depend
    # on the load in the last bits, qru.kernels.threads.step_threads)
    threads: int | str | None = None


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

    ``quant_aware`` (formats, e.g. ``["nf4"]``): quantization-aware unlearning
    (:mod:`qru.train.quant_aware`, docs/quant_aware.md): the loss is ``L(full precision) +
    qa_weight · L(quantized)`` (forget term and regularizer alike), ``L(quantized)`` with every
    export-quantized linear fake-quantized (straight-through gradients), in one random format per
    step (``qa_sample="random"``) or summed over the formats (``"sum"``); block size and skip as
    ``qru quantize`` (``qa_block_size`` None: each format's default; ``qa_skip``). Eval rows gain
    ``code_flip_frac`` and ``forget_nll_q`` per format. ``qa_margin`` = m (nats) adds
    ``qa_margin_weight · mean_i relu(NLL_fp_i − NLL_q_i + m)`` over the forget sequences
    (:func:`qru.train.quant_aware.margin_loss`; ``qa_margin_grad``: its gradient, straight through
    the rounding or with the quantized side detached): the quantized model must forget at least m
    nats more than its full-precision latent, which STE alone does not give (docs/quant_aware.md).

    ``saliency_mask`` = K (full mode): train only the K modules with the largest forget-gradient norm
    at the start (SURE, Zhang et al. 2024; :mod:`qru.train.saliency`), the rest frozen.
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
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    beta: float | None = None  # None: 0.1 for NPO, 2.5 for SimNPO
    delta: float = L.SIMNPO_DELTA
    forget_weight: float = 1.0  # gamma
    retain_weight: float = 1.0  # alpha
    tokenizer: str | None = None  # default: the tokenizer beside the model (tokenizer.json or tokenizer.model)
    qa_loss: str = "answer"
    train: str = "all"  # full mode: "all" parameters | "linears" (only what 4-bit export quantizes)
    lr_relative: float | None = None  # full mode: lr = lr_relative * std(W) per matrix (``lr`` is then unused)
    stall_threshold: float = STALL_THRESHOLD  # warn when forget loss / NLL moved less than this (relative)
    quant_aware: list[str] | None = None  # formats to train through (fake quantization, STE); None: off
    qa_weight: float = 1.0  # lambda in L(full precision) + lambda * L(quantized)
    qa_sample: str = "random"  # several formats: "random" (one per step, seeded) | "sum"
    qa_block_size: int | None = None  # as qru quantize --block-size (None: each format's default)
    qa_skip: list[str] = field(default_factory=lambda: ["lm_head"])  # as qru quantize --skip
    qa_margin: float | None = None  # nats: hinge keeping each forget sequence's NLL_q >= NLL_fp + margin; None: off
    qa_margin_weight: float = 1.0  # weight of that hinge in the loss
    qa_margin_grad: str = "ste"  # the hinge's gradient: "ste" (straight through) | "exact" (quantized side detached)
    saliency_mask: int | None = None  # full mode: train only the top-K modules by forget-gradient norm

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
    try:
        check_threads(c.threads)
    except ValueError as e:
        raise TrainConfigError(str(e)) from None


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
    _validate_quant_aware(c)
    _check(c.saliency_mask is None or (_is_int(c.saliency_mask) and c.saliency_mask > 0), "saliency_mask",
           c.saliency_mask, "None or a positive number of modules")
    _check(c.saliency_mask is None or c.mode == "full", "saliency_mask", c.saliency_mask,
           "None in LoRA mode (it selects the modules full fine-tuning trains)")
    if isinstance(c.forget, (str, os.PathLike)):
        c.forget = [str(c.forget)]
    if isinstance(c.retain, (str, os.PathLike)):
        c.retain = [str(c.retain)]
    _check(bool(c.forget), "forget", c.forget, "at least one data path")
    if c.reg != "none" and not c.retain:
        raise TrainConfigError(f"reg={c.reg!r} needs retain data (retain is empty)")


def _validate_quant_aware(c: UnlearnConfig) -> None:
    if isinstance(c.quant_aware, str):
        c.quant_aware = [f.strip() for f in c.quant_aware.split(",") if f.strip()]
    if isinstance(c.qa_skip, str):
        c.qa_skip = list(qa.parse_skip(c.qa_skip))
    w = c.qa_weight
    _check(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0, "qa_weight", w,
           "a finite number >= 0")
    _check(c.qa_sample in qa.SAMPLES, "qa_sample", c.qa_sample, f"one of {qa.SAMPLES}")
    m = c.qa_margin
    _check(m is None or (isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m >= 0),
           "qa_margin", m, "None or a finite number of nats >= 0")
    w = c.qa_margin_weight
    _check(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0,
           "qa_margin_weight", w, "a finite number > 0")
    _check(m is not None or w == 1.0, "qa_margin_weight", w, "1.0 without qa_margin (it weights the margin)")
    _check(c.qa_margin_grad in qa.MARGIN_GRADS, "qa_margin_grad", c.qa_margin_grad, f"one of {qa.MARGIN_GRADS}")
    _check(m is not None or c.qa_margin_grad == "ste", "qa_margin_grad", c.qa_margin_grad,
           "'ste' without qa_margin (it sets the margin's gradient)")
    if c.quant_aware is None:
        for name, default in (("qa_weight", 1.0), ("qa_sample", "random"), ("qa_block_size", None),
                              ("qa_skip", ["lm_head"]), ("qa_margin", None)):
            _check(getattr(c, name) == default, name, getattr(c, name), f"{default!r} without quant_aware "
                   "(it sets the quantization-aware loss)")
        return
    try:
        c.quant_aware = qa.parse_formats(c.quant_aware)
    except ValueError as e:
        raise TrainConfigError(str(e)) from None
    for fmt in c.quant_aware:
        try:
            resolve_block_size(fmt, c.qa_block_size)
        except ValueError as e:
            raise TrainConfigError(f"qa_block_size: {e}") from None
    _check(not c.gradient_checkpointing, "gradient_checkpointing", c.gradient_checkpointing,
           "False with quant_aware (the backward's recomputation would run outside the quantized pass)")


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


def check_vocab(model_vocab: int, tok: Tokenizer, model_src, tok_src) -> None:
    if tok.vocab_size > model_vocab:
        raise TrainConfigError(
            f"vocabulary mismatch: tokenizer {tok_src} has {tok.vocab_size} pieces but the model {model_src} has "
            f"vocab_size={model_vocab}; use the tokenizer the model was trained with")
    if tok.vocab_size < model_vocab:
        warnings.warn(f"model {model_src} has vocab_size={model_vocab} > tokenizer {tok_src} ({tok.vocab_size} "
                      "pieces); the extra embedding rows are unused")


def model_dtype(master_dtype: str) -> torch.dtype:
    return torch.bfloat16 if master_dtype == "bf16" else torch.float32

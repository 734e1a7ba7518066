"""``qru plan``: per-rank memory of a training run sharded with FSDP2 (:mod:`qru.train.distributed`).

The formula (bytes per rank; W ranks, every count in elements):

- model shapes: ``P`` parameters (``LlamaConfig.num_parameters``), of which ``P_layer`` per decoder
  layer and ``P_root`` in the root unit (embeddings, final norm, untied head); LoRA adds
  ``A = sum over the targets of r * (in + out)`` per layer (``P_lora = L * A``). ``T`` trainable:
  ``P`` (full, ``--train all``), the layers' seven linears (full, ``--train linears``), ``P_lora``
  (LoRA).
- ``m`` = bytes of the master dtype (fp32 4, bf16 2); ``c`` = bytes of the gathered compute
  copy (2 with bf16 precision or bf16 master, else 4); ``a`` = bytes of an activation (2 with
  bf16 precision or bf16 master, else 4).
- **weights** ``= (P + P_lora) * m / W`` (every rank holds its shard), plus, when sharded
  (torchrun), the gathered compute copies FSDP2 holds at once: the root unit for the whole
  step and two layer units (the running one and the prefetched next): ``(P_root + 2 P_layer) * c``.
- **grads** ``= T * m / W`` (sharded), plus when sharded one layer unit's unsharded gradient in the
  compute dtype and its fp32 reduce-scatter input: ``T_layer * (c + 4)``.
- **optimizer** (AdamW, two moments in the parameter's dtype) ``= 2 T * m / W``.
- **activations** of ``n = batch * seq`` tokens per forward pass (``batch``: rows per rank, i.e.
  ``qru unlearn --batch-size`` / W), ``f`` forward passes
  alive at the backward (2 for unlearning with a retain regulariser: forget + retain batch; 1
  otherwise). A decoder layer saves per token ``s = 4H + 2 q + 2 kv + 3 I`` values (the two norm
  inputs and outputs, q, k, v and the attention output, gate, up and the SwiGLU output; ``q`` =
  heads x head_dim, ``kv`` = kv_heads x head_dim; LoRA adds ``r`` per target). Without gradient
  checkpointing: ``f * n * a * (L * s + 2H)``; with it only each layer's input is kept and one
  layer is recomputed at a time: ``f * n * a * (L * H + s + 2H)`` (the ``2H``: final norm input
  and output).

Not counted: the framework itself (CUDA context, kernels, allocator fragmentation), the
temporary of the chunked head (``chunk x vocab`` fp32), the KL reference logits of KLR
(``n * vocab * 4`` per pass) and NPO's reference table (4 bytes per forget example).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from qru.model.config import LlamaConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 1024 ** 3


class PlanError(ValueError):
    """An invalid ``qru plan`` option; the message names it."""


@dataclass
class MemoryPlan:
    """Bytes per rank, by component (see the module docstring for the formula)."""
    weights: int
    grads: int
    optimizer: int
    activations: int
    params: int
    trainable: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def model_config(spec: str | int) -> LlamaConfig:
    """A config from a ``config.json`` (or its directory), a preset name, or a parameter count
    (``7e9``, ``"7B"``, ``"350M"``: a Llama-2-shaped model of about that size: hidden 128·k,
    intermediate 8/3·hidden rounded up to 256, 32 layers for >= 6B, head_dim 128)."""
    if isinstance(spec, str):
        p = Path(spec)
        if p.suffix == ".json" or p.is_dir():
            return LlamaConfig.from_json(p)
        count = _parse_count(spec)
        if count is None:
            return LlamaConfig.preset(spec)
    else:
        count = int(spec)
    if count <= 0:
        raise PlanError(f"model size must be positive, got {spec!r}")
    return _llama_shaped(count)


def _parse_count(s: str) -> int | None:
    t = s.strip().upper().replace("_", "")
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        return None


def _llama_shaped(count: int) -> LlamaConfig:
    vocab = 32000
    best = None
    for layers in (2, 4, 8, 12, 16, 24, 32, 40, 48, 60, 80):
        for hidden in range(256, 16385, 128):
            inter = -(-int(hidden * 8 / 3) // 256) * 256
            heads = max(1, hidden // 128)
            if hidden % heads:
                continue
            cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                              num_attention_heads=heads)
            err = abs(cfg.num_parameters() - count) / count
            # aspect ratio of Llama-2: hidden / layers ~ 128
            score = err + 0.02 * abs(math.log(hidden / layers / 128))
            if best is None or score < best[0]:
                best = (score, cfg)
    return best[1]


def _layer_params(cfg: LlamaConfig) -> tuple[int, int]:
    """(all parameters, linear weights) of one decoder layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    lin = h * q + 2 * h * kv + q * h + 3 * h * i
    bias = (q + 2 * kv + h if cfg.attention_bias else 0) + (2 * i + h if cfg.mlp_bias else 0)
    return lin + bias + 2 * h, lin


def lora_params_per_layer(cfg: LlamaConfig, r: int, targets=TARGETS) -> int:
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    bad = [t for t in targets if t not in shapes]
    if bad:
        raise PlanError(f"targets: unknown module {bad[0]!r} (known: {', '.join(shapes)})")
    return sum(r * (a + b) for a, b in (shapes[t] for t in targets))


def plan_memory(cfg: LlamaConfig, *, mode: str = "full", world: int = 1, seq: int = 2048, batch: int = 1,
                master_dtype: str = "fp32", precision: str = "bf16", gradient_checkpointing: bool = False,
                rank: int = 8, targets=TARGETS, train: str = "all", forwards: int = 2,
                sharded: bool | None = None) -> MemoryPlan:
    """Per-rank memory of one training step (the formula of the module docstring). ``batch``: rows
    per rank of one micro-batch (the global batch / ``world``); ``forwards``: forward passes alive at the
    backward; ``sharded`` (default ``world > 1``): FSDP2's gathered copies are counted."""
    for name, v, lo in (("world", world, 1), ("seq", seq, 1), ("batch", batch, 1), ("forwards", forwards, 1),
                        ("rank", rank, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise PlanError(f"{name} must be an integer >= {lo}, got {v!r}")
    if mode not in ("full", "lora"):
        raise PlanError(f"mode must be 'full' or 'lora', got {mode!r}")
    if master_dtype not in ("fp32", "bf16"):
        raise PlanError(f"master_dtype must be 'fp32' or 'bf16', got {master_dtype!r}")
    if precision not in ("fp32", "bf16"):
        raise PlanError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if train not in ("all", "linears"):
        raise PlanError(f"train must be 'all' or 'linears', got {train!r}")
    sharded = world > 1 if sharded is None else sharded
    L, H, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    P = cfg.num_parameters()
    p_layer, lin_layer = _layer_params(cfg)
    p_root = P - L * p_layer
    lora_layer = lora_params_per_layer(cfg, rank, targets) if mode == "lora" else 0
    if mode == "lora":
        T, t_layer = L * lora_layer, lora_layer
    elif train == "linears":
        T, t_layer = L * lin_layer, lin_layer
    else:
        T, t_layer = P, p_layer
    m = 4 if master_dtype == "fp32" else 2
    c = 2 if (precision == "bf16" or master_dtype == "bf16") else 4
    a = c
    weights = (P + L * lora_layer) * m / world
    grads = T * m / world
    if sharded:
        weights += (p_root + 2 * (p_layer + lora_layer)) * c
        grads += t_layer * (c + 4)
    optimizer = 2 * T * m / world
    n = batch * seq
    s = 4 * H + 2 * q + 2 * kv + 3 * I + (len(targets) * rank if mode == "lora" else 0)
    per_token = (L * H + s + 2 * H) if gradient_checkpointing else (L * s + 2 * H)
    acts = forwards * n * a * per_token
    return MemoryPlan(int(weights), int(grads), int(optimizer), int(acts), P + L * lora_layer, T)


def plan_table(cfg: LlamaConfig, worlds=(1, 8, 16), modes=("full", "lora"), **kw) -> list[dict]:
    """One row per (mode, world size, gradient checkpointing) of :func:`plan_memory`, in GiB."""
    rows = []
    for mode in modes:
        for w in worlds:
            for gc in (False, True):
                p = plan_memory(cfg, mode=mode, world=w, gradient_checkpointing=gc, **kw)
                rows.append({"mode": mode, "world": w, "checkpointing": gc,
                             **{k: v / GIB for k, v in p.as_dict().items() if k not in ("params", "trainable")}})
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`plan_table` rows."""
    head = "| mode | ranks | grad. ckpt | weights | grads | optimizer | activations | total (GiB) |"
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['world']} | {'yes' if r['checkpointing'] else 'no'} | {r['weights']:.2f} | "
                     f"{r['grads']:.2f} | {r['optimizer']:.2f} | {r['activations']:.2f} | {r['total']:.2f} |")
    return "\n".join(lines)

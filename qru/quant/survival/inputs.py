"""Survival inputs: the base / unlearned checkpoints as tensor indexes (headers only), the adapter's
updates, the analysed weight names, and the calibration activations (the base model run one decoder
layer at a time)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from qru.data import read_texts
from qru.model.checkpoint import CheckpointError, ShardReader, checkpoint_files
from qru.model.config import LlamaConfig, rope_cos_sin, rope_inv_freq
from qru.model.llama import DecoderLayer, RMSNorm
from qru.model.lora import adapter_updates
from qru.quant.qlinear import is_skipped
from qru.quant.survival.stats import SurvivalError, layer_index

DEFAULT_SKIP = ("lm_head",)


class TensorIndex:
    """Tensor name → shard reader over a checkpoint directory (headers only)."""

    def __init__(self, path: str | os.PathLike, role: str = "checkpoint"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{role} directory not found: {self.path}")
        self.readers: dict[str, ShardReader] = {}
        self.order: list[str] = []
        for f in checkpoint_files(self.path):
            r = ShardReader(f)
            for k in r.keys():
                if k in self.readers:
                    raise CheckpointError(f"{f}: tensor {k!r} also appears in {self.readers[k].path.name}")
                self.readers[k] = r
                self.order.append(k)

    def __contains__(self, name: str) -> bool:
        return name in self.readers

    def shape(self, name: str) -> tuple[int, ...]:
        return self.readers[name].shape(name)

    def dtype(self, name: str) -> str:
        return self.readers[name].header[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.readers:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self.readers[name].get(name)


def linear_names(index: TensorIndex, skip: Sequence[str] = DEFAULT_SKIP) -> list[str]:
    """The analysed weight names, sorted by layer index (layer-less last), then checkpoint order."""
    names = [k for k in index.order
             if k.endswith(".weight") and len(index.shape(k)) == 2 and index.dtype(k) in ("F32", "F16", "BF16")
             and "embed_tokens" not in k.split(".") and not is_skipped(k[: -len(".weight")], skip)]
    pos = {k: i for i, k in enumerate(index.order)}
    big = 1 << 30
    return sorted(names, key=lambda k: (layer_index(k) if layer_index(k) is not None else big, pos[k]))


def _finite(name: str, t: torch.Tensor, where: str, row0: int = 0) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        if first and row0:
            first[0] += row0
        raise SurvivalError(f"{where}tensor {name!r} has non-finite value(s) (NaN or Inf), "
                            f"first at index {tuple(first)}")


def load_adapter_updates(adapter: str | os.PathLike, base: TensorIndex) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Base weight name → (A fp32, B fp32, scale) of a PEFT LoRA adapter, checked against ``base``
    (:func:`qru.model.lora.adapter_updates`)."""
    return adapter_updates(adapter, {k: base.shape(k) for k in base.order}, base.path)


# ----------------------------------------------------------------------------- calibration


def calib_texts(path: str | os.PathLike) -> list[str]:
    """Texts of a calibration source (:func:`qru.data.read_texts`): a ``.txt`` file, a JSON / JSON Lines
    file (records with ``text``, ``question``+``answer``, ``prompt``+``gt``, or plain strings), or a
    directory: its ``raw/*.txt`` or ``*.txt`` if any, else every ``*.json``/``*.jsonl`` below it (MUSE
    layout; ``meta.json`` excluded), sorted by path."""
    if not Path(path).exists():
        raise FileNotFoundError(f"calibration data not found: {path}")
    return read_texts(path)


def calib_ids(texts: Sequence[str], tokenizer, rows: int, seq_len: int) -> torch.Tensor:
    """Token ids (S, T) for calibration: each text as ``bos + tokens + eos``, concatenated and
    cut into ``ceil(rows / seq_len)`` sequences of ``seq_len`` (fewer if the text runs out; one
    shorter sequence if there is less than ``seq_len``)."""
    need = -(-rows // seq_len) * seq_len
    stream: list[int] = []
    for t in texts:
        stream += tokenizer.encode(t, bos=True, eos=True)
        if len(stream) >= need:
            break
    if len(stream) < 2:
        raise SurvivalError("calibration data tokenizes to fewer than 2 tokens")
    if len(stream) < seq_len:
        return torch.tensor([stream], dtype=torch.long)
    n = min(need, len(stream) // seq_len * seq_len)
    return torch.tensor(stream[:n], dtype=torch.long).view(-1, seq_len)


@torch.no_grad()
def stream_inputs(base_dir: str | os.PathLike, ids: torch.Tensor, rows: int, *, final: bool = False,
                  index: TensorIndex | None = None) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    """Run the base model one decoder layer at a time (fp32) on ``ids`` and yield, per layer,
    ``(layer index, {linear module name: its input, first rows × in})``; with ``final`` a last
    ``(None, {"lm_head": final-norm output})``. Only one layer's weights are held."""
    base_dir = Path(base_dir)
    cfg = LlamaConfig.from_json(base_dir / "config.json")
    index = index or TensorIndex(base_dir, "base checkpoint")
    emb = index.get("model.embed_tokens.weight")
    x = emb[ids].float()
    del emb
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(ids.shape[1]).expand(*ids.shape), torch.float32)

    def grab(mods, into):
        # q/k/v (gate/up) share one input: store it once. The inputs are held (not keyed by
        # id(), which a freed tensor's successor may reuse) until the layer is done.
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hooks = []
        for name, m in mods:
            def hook(_m, inp, _out, name=name):
                t = inp[0]
                hit = next((c for u, c in seen if u is t), None)
                if hit is None:
                    hit = t.reshape(-1, t.shape[-1])[:rows].float().clone()
                    seen.append((t, hit))
                into[name] = hit
            hooks.append(m.register_forward_hook(hook))
        return hooks

    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        with torch.device("meta"):
            layer = DecoderLayer(cfg, i)
        sd = {k: index.get(prefix + k).float() for k in layer.state_dict()}
        layer.load_state_dict(sd, assign=True)
        del sd
        got: dict[str, torch.Tensor] = {}
        hooks = grab([(prefix + n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)], got)
        x = layer(x, cos, sin, None, None)
        for h in hooks:
            h.remove()
        del layer
        yield i, got
    if final:
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        norm.weight.data = index.get("model.norm.weight").float()
        yield None, {"lm_head": norm(x).reshape(-1, cfg.hidden_size)[:rows].clone()}

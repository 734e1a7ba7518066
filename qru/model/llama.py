"""A from-scratch Llama with Hugging Face module names, so HF checkpoints load with no key map.

RMSNorm in fp32, RoPE in HF's rotate-half convention (with rope_scaling), GQA attention
through ``scaled_dot_product_attention`` (CPU inference: ``qru.kernels.causal_attention`` for
prompts and ``decode_attention`` for decode steps), SwiGLU MLP, a static KV cache. Linear layers are
``nn.Linear`` subclasses so LoRA and quantized modules plug in by module swap. RMSNorm, RoPE (with
the head transpose) and the SwiGLU gate run as fused kernel ops (``qru.kernels.rmsnorm`` /
``rope`` / ``swiglu``: C++ on CPU, Triton on CUDA), each equal to the plain composite it
replaces up to float round-off. Every linear layer is a :class:`qru.model.linear.Linear` (an
``nn.Linear``, same state-dict names) whose forward is qru's one linear dispatch
(``qru.kernels.linear``); in no-grad CPU inference, where the dispatch packs weights, attention's
q/k/v and the MLP's gate/up run as one GEMM each on a packed concatenated weight
(:func:`qru.model.linear.fused_linears`). A KV cache may hold a prefix shared by all its rows,
kept once (``KVCache.prefix_keys``); :class:`Attention` then attends to it before the rows' own
keys (``qru.kernels.prefix_attention``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qru.kernels.causal_attention import causal_attention
from qru.kernels.decode_attention import decode_attention
from qru.kernels.linear import PackedWeight
from qru.kernels.prefix_attention import prefix_attention
from qru.kernels.rmsnorm import rms_norm
from qru.kernels.rope import rope
from qru.kernels.swiglu import swiglu, swiglu_halves
from qru.model.checkpoint import load_pretrained, save_pretrained
from qru.model.config import LlamaConfig, rope_cos_sin, rope_inv_freq
from qru.model.gguf import load_gguf
from qru.model.linear import Linear, fused_linears


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    """q, k: (B, H, T, D); cos, sin: (B, T, D) in the activations' dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@dataclass
class KVCache:
    """Static per-layer key/value buffers of shape (B, kv_heads, max_len, head_dim).

    ``prefix_keys``/``prefix_values`` (optional, per layer (kv_heads, P, head_dim)): a prefix that
    every row attends to in full before its own positions, held once for the whole batch (e.g. the
    few-shot examples shared by all prompts, ``qru.eval.generation``). It is not counted in
    ``seen`` or in attention masks; the caller shifts positions by its length.

    ``segments`` (set by :meth:`packed_rows`, prefill only): the forward's one row holds several
    cache rows' prompts end to end; each ``(row, start, length, dest)`` is tokens
    ``start:start+length`` of the forward, cache row ``row`` positions ``dest:dest+length``
    (:meth:`attend_segments`)."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    seen: int = 0
    prefix_keys: list[torch.Tensor] | None = None
    prefix_values: list[torch.Tensor] | None = None
    segments: list[tuple[int, int, int, int]] | None = None

    def __post_init__(self):
        if (self.prefix_keys is None) != (self.prefix_values is None):
            raise ValueError("KVCache: give both prefix_keys and prefix_values, or neither")
        if self.prefix_keys is not None and not (len(self.prefix_keys) == len(self.prefix_values) == len(self.keys)):
            raise ValueError(f"KVCache: {len(self.keys)} layers but {len(self.prefix_keys)} prefix keys and "
                             f"{len(self.prefix_values)} prefix values")

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        end = self.seen + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > cache length {self.max_len}")
        self.keys[layer][:, :, self.seen:end] = k
        self.values[layer][:, :, self.seen:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (drop finished sequences); the prefix stays."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]

    def packed_rows(self, segments: list[tuple[int, int, int, int]]) -> "KVCache":
        """This cache (same buffers and prefix) for one forward over several rows' prompts packed end
        to end in a single row: ``segments`` as in the class docstring. Every token attends
        causally within its own segment only (and to the prefix), its keys/values written to its
        row's positions; the numbers are those of each row's prompt alone."""
        return KVCache(self.keys, self.values, 0, self.prefix_keys, self.prefix_values, list(segments))

    def attend_segments(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of a packed-rows forward (``q`` (1, H, N, D), ``k``/``v`` (1, KV, N, D)): each
        segment's keys/values go to its cache row, then causal attention over them (after the prefix,
        if any), as :class:`Attention` runs one row's prompt alone."""
        out = q.new_empty(q.shape)
        for row, start, n, dest in self.segments:
            kc = self.keys[layer][row:row + 1, :, dest:dest + n]
            vc = self.values[layer][row:row + 1, :, dest:dest + n]
            kc.copy_(k[:, :, start:start + n])
            vc.copy_(v[:, :, start:start + n])
            qs = q[:, :, start:start + n]
            if self.prefix_keys is not None:
                out[:, :, start:start + n] = prefix_attention(qs, self.prefix_keys[layer], self.prefix_values[layer],
                                                              kc, vc, None)
            else:
                out[:, :, start:start + n] = causal_attention(qs, kc, vc)
        return out

    def part(self, rows=slice(None), start: int = 0, seen: int = 0) -> "KVCache":
        """A cache over batch ``rows`` (a slice: views into this cache; an index tensor: copies)
        and positions ``start:``, with ``seen`` positions filled and the same shared prefix."""
        return KVCache([k[rows][:, :, start:] for k in self.keys], [v[rows][:, :, start:] for v in self.values],
                       seen, self.prefix_keys, self.prefix_values)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=b)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=b)
        self.qkv_packed = PackedWeight()  # q/k/v as one packed GEMM in inference (fused_linears)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        qkv = fused_linears((self.q_proj, self.k_proj, self.v_proj), x, self.qkv_packed)
        if qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = qkv.split((self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                 self.n_kv * self.head_dim), dim=-1)
        q = rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = rope(k.view(B, T, self.n_kv, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None and cache.segments is not None:  # several rows' prompts packed in one row
            out = cache.attend_segments(self.layer_idx, q, k, v)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = self.n_kv != self.n_heads
        if cache is not None and cache.prefix_keys is not None:  # a prefix all rows share, held once
            i = self.layer_idx
            out = prefix_attention(q, cache.prefix_keys[i], cache.prefix_values[i], k, v, mask)
        elif T == 1 and q.device.type == "cpu" and not torch.is_grad_enabled():
            out = decode_attention(q, k, v, mask)
        elif mask is None and k.shape[2] == T:
            out = causal_attention(q, k, v)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)
        self.gate_up_packed = PackedWeight()  # gate/up as one packed GEMM in inference (fused_linears)

    def forward(self, x):
        gate_up = fused_linears((self.gate_proj, self.up_proj), x, self.gate_up_packed)
        if gate_up is not None:
            return self.down_proj(swiglu_halves(gate_up))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """Causal LM. ``forward(input_ids, attention_mask, position_ids, cache) -> logits``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self._inv_freq: torch.Tensor | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # -- set-up --------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """HF's initialisation: normal(0, initializer_range) for linears and embeddings."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                w = torch.empty(m.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                m.weight.copy_(w)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        ref = self.model.embed_tokens.weight
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.float32)
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        n = cfg.num_hidden_layers
        return KVCache([torch.zeros(shape, dtype=dtype, device=ref.device) for _ in range(n)],
                       [torch.zeros(shape, dtype=dtype, device=ref.device) for _ in range(n)])

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # -- forward -------------------------------------------------------------------------
    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        dev = position_ids.device
        if self._inv_freq is None or self._inv_freq.device != dev:
            self._inv_freq = rope_inv_freq(self.config).to(dev)
        return rope_cos_sin(self._inv_freq, position_ids, dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                num_logits: int | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or (B, num_logits, V) for the last positions only.

        ``attention_mask`` (B, past+T) marks real tokens with 1 and padding with 0 and
        covers the cached positions too. Without ``position_ids`` positions count real
        tokens only, so a left-padded row sees the same positions as it would alone.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = cache.seen if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != (batch, past+seq) "
                             f"= {(B, past + T)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        mask = self._mask(attention_mask, B, T, past, input_ids.device)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.seen = past + T
        x = self.model.norm(x)
        if num_logits is not None:
            x = x[:, -num_logits:]
        if return_hidden:
            return x
        return self.lm_head(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (``forward(..., return_hidden=True)``'s output): the
        ``lm_head`` as ``forward`` runs it."""
        return self.lm_head(hidden)

    @staticmethod
    def _mask(attention_mask, B, T, past, device):
        """Boolean (B, 1, T, past+T) mask, or None when plain causal attention suffices."""
        if attention_mask is None and past == 0:
            return None
        S = past + T
        if T == 1 and attention_mask is not None:  # a decode step: every key is causal, the query sees itself
            m = attention_mask != 0
            m[:, -1] = True
            return m[:, None, None, :]
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        m = (k_pos <= q_pos)[None, None]
        if attention_mask is not None:
            m = m & attention_mask.bool()[:, None, None, :]
            # A padding query would see no key at all; let it see itself so SDPA stays finite.
            m = m | (k_pos == q_pos)[None, None]
        return m.expand(B, 1, T, S)

    # -- checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu", check_finite: bool = True) -> "Llama":
        return load_pretrained(cls, path, dtype=dtype, device=device, check_finite=check_finite)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                  device: str | torch.device = "cpu", check_finite: bool = True) -> "Llama":
        """A llama.cpp GGUF file (architecture ``llama``), dequantized to ``dtype`` (``qru.model.gguf``).
        Its tokenizer: ``qru.model.gguf.gguf_tokenizer(path)``."""
        return load_gguf(cls, path, dtype=dtype, device=device, check_finite=check_finite)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "2GB") -> None:
        save_pretrained(self, path, max_shard_size=max_shard_size)

"""Helpers shared by tests that compare against transformers (test-only peer)."""
from __future__ import annotations

import torch


def hf_config(**kw):
    from transformers import LlamaConfig as HFConfig

    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=128, max_position_embeddings=256)
    base.update(kw)
    return HFConfig(**base)


def hf_model(seed: int = 0, dtype=torch.float32, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(**kw)
    cfg.initializer_range = 0.1  # larger weights: a sharper test than near-uniform logits
    return LlamaForCausalLM(cfg).to(dtype).eval()

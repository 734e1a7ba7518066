"""Greedy decoding's next tokens: the index of each row's maximum over the last dim.

``argmax(x)`` equals ``x.argmax(-1)``: the first index of the maximum, or of the first NaN. One
public entry, :func:`argmax`: ``"cpp"`` (``csrc/llama_ops.cpp``, CPU float32/bfloat16 rows: a vector
max, then the first index holding it), else :func:`argmax_reference`. torch's CPU argmax over the
last dim of (8, 32000) logits takes ~0.4 ms in fp32 (bf16: widened first, it is slower still);
a decode step's whole lm_head GEMM takes a few times that.
"""
from __future__ import annotations

import torch

from qru.kernels._backend import backend_for, load_cpp_ext


def argmax_reference(x: torch.Tensor) -> torch.Tensor:
    """The oracle: torch's argmax over the last dim (bf16/fp16 widened to fp32 first: the same
    index, since widening is exact, and faster)."""
    return x.float().argmax(-1) if x.dtype in (torch.bfloat16, torch.float16) else x.argmax(-1)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (int64, shape ``x.shape[:-1]``); see the module docstring."""
    if (x.dim() == 0 or x.shape[-1] == 0 or x.numel() == 0 or x.dtype not in (torch.float32, torch.bfloat16)
            or x.device.type != "cpu" or backend_for(x, cpp="llama_ops") != "cpp"):
        return argmax_reference(x)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return load_cpp_ext("llama_ops").argmax_rows(x2).view(x.shape[:-1])

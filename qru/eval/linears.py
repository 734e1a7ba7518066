"""fp32 inference linears through oneDNN with prepacked weights, for evaluation on CPU.

PyTorch sends a CPU fp32 ``nn.Linear`` to MKL's sgemm, which repacks the weight on every
call and, on CPUs it does not recognise as Intel, runs its AVX2 code path. oneDNN uses the
widest ISA the CPU has, and a weight packed once is reused by every call. On the bench box
(an AVX-512 AMD EPYC, 1 thread) the small model's layer GEMMs ran about 2x faster this way at
84-896 rows (prefill, scoring) and 1.3-1.6x at 2-16 rows (batched decode); see
``bench/bench_eval.py``. A single row (one-by-one decode) keeps ``F.linear``: MKL's GEMV is
as fast there. Results equal ``F.linear``'s up to float round-off (a different summation order).

Only with one torch thread: oneDNN parallelises every call, however small, and when another
process holds one of the box's two cores each call waits for the descheduled thread. With 2
threads and another process busy on the other core, TOFU (n=8, batched) took 64.8 s through
oneDNN against 0.65 s through MKL (and 0.53 s with oneDNN on 1 thread), so with more threads
the linears stay on ``F.linear``.

``packed_linears(model)`` is a context: inside it every plain fp32 CPU ``nn.Linear`` of the
model runs this way when autograd is off, torch uses one thread and the per-machine calibration
(:mod:`qru.kernels.calibrate`, choice ``packed_fp32``, override ``QRU_PACKED_FP32``) found it
faster than ``F.linear``; a weight changed in place
is repacked on its next call. The packed copies cost as much memory as the weights, so models
whose fp32 linear weights exceed ``max_bytes`` are left alone.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from qru.kernels._backend import plain_cpu_linears, rerouted
from qru.kernels.calibrate import onednn_available, pick

MAX_BYTES = 2 << 30


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """oneDNN's linear passes qru.kernels.dense's probe and torch has its weight packing."""
    return onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class _Packed:
    """The packed weight of one module, repacked when the weight's version changes."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.version = -1
        self.weight = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        w = m.weight
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu"
                or w.dtype != torch.float32 or x.numel() <= x.shape[-1] or torch.get_num_threads() != 1):
            return F.linear(x, w, m.bias)
        if self.version != w._version or self.weight is None:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            self.version = w._version
        bias = None if m.bias is None else m.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model: nn.Module, enabled: bool = True, max_bytes: int = MAX_BYTES):
    """Within the block, plain fp32 CPU linears of ``model`` run oneDNN with packed weights
    (when available, no grad, one torch thread, more than one row). Restores the modules
    afterwards."""
    on = enabled and available() and torch.get_num_threads() == 1 and pick("packed_fp32") == "onednn"
    mods = plain_cpu_linears(model, torch.float32) if on else []
    if sum(m.weight.numel() * m.weight.element_size() for m in mods) > max_bytes:
        mods = []
    with rerouted(mods, _Packed):
        yield model

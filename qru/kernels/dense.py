"""Dense fp32 GEMMs on CPU through oneDNN: ``y = x Wᵀ (+ b) (+ add)``.

PyTorch sends a CPU fp32 ``mm``/``linear`` to MKL's sgemm, which on CPUs it does not take
for Intel runs its AVX2 code path. oneDNN (bundled with torch) uses the widest ISA the CPU
has. On the 2-core AMD EPYC (AVX-512) development VM, one thread: MKL 88-93 GFLOP/s, oneDNN
150-215 GFLOP/s on the training shapes (M 1024-2048, K and N 512-32000; any operand
strides, no weight pre-packing needed); on an Intel Xeon both reach the same rate. So the
choice is measured per machine (:mod:`qru.kernels.calibrate`, choice ``dense_fp32``,
override ``QRU_DENSE_FP32=onednn|torch``), not assumed. Results equal torch's up to float
round-off (a different summation order).

One entry, :func:`dense_linear`, picks the path at call time: oneDNN for fp32 CPU tensors
with more than one row of ``x`` (a single row is a GEMV, where MKL is as fast) where the
calibration picked it, unless ``QRU_BACKEND=torch``; otherwise :func:`dense_linear_reference` (torch's ``addmm``/``mm``),
which is also the oracle in tests. The ops that use it (the LoRA linear, the fused
log-probs head) call it inside their own autograd Functions; it records no graph itself.
:class:`DenseLinearFn` is the autograd-capable ``F.linear`` on top, one of the paths of the one
linear dispatch, :func:`qru.kernels.linear.linear`.
"""
from __future__ import annotations

import torch

from qru.kernels._backend import forced_backend
from qru.kernels.calibrate import onednn_available, pick


def dense_linear_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                           add: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """``x Wᵀ + bias + add`` with torch ops; ``x`` (M, K), ``w`` (N, K), ``add`` (M, N).
    ``accumulate``: the product is added into ``add`` in place (``addmm_``), which is returned."""
    if add is not None:
        y = add.addmm_(x, w.t()) if accumulate else torch.addmm(add, x, w.t())
        return y if bias is None else y.add_(bias)
    return torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())


# With several threads, a GEMM this small (multiply-adds) stays with torch: oneDNN splits every call
# across the team, and on a shared machine one descheduled thread stalls each such call (seen in
# batched evaluation: 64.8 s vs 0.65 s); large GEMMs amortise the wait.
SMALL_MACS = 1 << 24


def use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`dense_linear` takes oneDNN for these operands (checked per call)."""
    f32 = torch.float32
    return (x.device.type == "cpu" and x.dtype == f32 and w.dtype == f32 and w.device.type == "cpu"
            and x.dim() == 2 and w.dim() == 2 and x.shape[0] > 1 and x.numel() > 0 and w.numel() > 0
            and (torch.get_num_threads() == 1 or x.shape[0] * w.shape[0] * w.shape[1] >= SMALL_MACS)
            and forced_backend() != "torch" and onednn_available() and pick("dense_fp32") == "onednn")


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                 add: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """``y = x Wᵀ + bias + add``: ``x`` (M, K), ``w`` (N, K) (any strides: pass ``W.t()`` for
    ``x W``), ``bias`` (N,), ``add`` (M, N). Use the return value: with ``accumulate`` the torch
    path adds into ``add`` in place and returns it, oneDNN returns a new tensor (its fused add
    reads ``add`` once). No autograd graph through oneDNN: call it from an autograd Function
    (or under no_grad)."""
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"dense_linear: x {tuple(x.shape)} and weight {tuple(w.shape)} do not share the "
                         f"inner dimension")
    if not use_onednn(x, w) or (bias is not None and bias.dtype != x.dtype) or (add is not None and add.dtype != x.dtype):
        return dense_linear_reference(x, w, bias, add, accumulate)
    ops = torch.ops.mkldnn
    if add is None:
        return ops._linear_pointwise(x, w, bias, "none", [], "")
    return ops._linear_pointwise.binary(x, add, w, bias, "add")


class DenseLinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` on 2-D fp32 CPU ``x`` (M, K), ``W`` (N, K), every GEMM through oneDNN.

    Backward, ``G = ∂L/∂y`` (M, N). From ``y_mn = Σ_k x_mk W_nk + b_n``: ``∂y_mn/∂x_mk = W_nk``,
    ``∂y_mn/∂W_nk = x_mk``, ``∂y_mn/∂b_n = 1``, so::

        dX = G W        (M, K)   dense_linear(G, Wᵀ)
        dW = Gᵀ X       (N, K)   dense_linear(Gᵀ, Xᵀ)  (transposed views, no copies)
        db = Σ_m G[m]   (N,)

    Saves ``x`` and ``W`` (what ``F.linear``'s autograd saves); each gradient only when needed.
    """

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return dense_linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dense_linear(g, w.t())
        if ctx.needs_input_grad[1]:
            dw = dense_linear(g.t(), x.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db

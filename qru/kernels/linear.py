"""The one linear dispatch: ``y = x Wᵀ + b`` for every dense linear layer of qru.

:func:`linear` picks an implementation per call (:func:`choose`) from the operands (device,
dtype, rows of ``x``), the grad mode, ``QRU_BACKEND`` and this machine's calibration
(:mod:`qru.kernels.calibrate`). Every path equals ``F.linear`` up to float round-off:

=============  ================================================================================
path           when
=============  ================================================================================
``"torch"``    ``F.linear`` itself: CUDA (cuBLAS; qru has no Triton GEMM), ``QRU_BACKEND=torch``
               or ``triton``, autocast on, other dtypes, a single row of ``x`` (MKL's GEMV is as
               fast), or when the calibration keeps torch's GEMM.
``"bf16"``     bf16 CPU operands, no gradient needed, not packed: :func:`qru.kernels.bf16_linear.bf16_linear`
               (the C++ skinny kernel for few rows, else a bf16 or widened fp32 GEMM).
``"packed"``   fp32 CPU, no gradient needed, more than one row, one torch thread, a cache slot
               given, and calibration ``packed_fp32`` = onednn (override ``QRU_PACKED_FP32``):
               oneDNN with the weight packed once and cached in the slot (:class:`PackedWeight`).
               bf16 the same, above ``PACKED_BF16_MIN_ROWS`` (4) rows, when calibration
               ``packed_bf16`` = onednn (override ``QRU_PACKED_BF16``; on AMX CPUs oneDNN's tile
               GEMM beats the skinny kernel from about 6 rows once the weight is not reordered
               per call).
``"dense"``    fp32 CPU, more than one row, calibration ``dense_fp32`` = onednn (override
               ``QRU_DENSE_FP32``; with several threads only for large GEMMs):
               :class:`qru.kernels.dense.DenseLinearFn`, oneDNN GEMMs forward and backward.
=============  ================================================================================

:func:`linear_group` runs several weights on one input (a block's q/k/v or gate/up projections) as
one ``"packed"`` GEMM on their packed concatenation, where the packed path would run; the caller
(:func:`qru.model.linear.fused_linears`) runs its layers one by one otherwise.

The choice is a pure function of the call: no module's ``forward`` is replaced and no flag is
switched around a block, so concurrent callers never see each other's choices. A packed weight
is keyed on the weight tensor (its identity, storage pointer and in-place ``_version``) and, for a
weight that requires grad, on the count of optimizer steps taken in the process (a global
``torch.optim`` post-step hook, registered when a trainable weight is first packed, counts them:
torch's fused AdamW updates parameters without bumping ``_version``). So an optimizer step, ``load_state_dict`` or ``.to()`` repacks it on the
next call; a stale copy is dropped on the first call that sees it stale. (A write through
``weight.data`` is not seen: it bypasses the version counter.) All packed copies of the process together stay
under ``QRU_PACKED_MAX_BYTES`` (default 2 GiB: they cost as much memory as the weights); past
it a linear takes the unpacked path.

``QRU_BACKEND=cpp`` demands the C++ skinny kernel where the bf16 path would take it (an error if
it cannot be built) and otherwise behaves as unforced on CPU; on CUDA it is an error, as for
every op (:func:`qru.kernels._backend.backend_for`).
"""
from __future__ import annotations

import functools
import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from qru.kernels._backend import forced_backend, load_cpp_ext, triton_usable
from qru.kernels.bf16_linear import bf16_linear, skinny_rows
from qru.kernels.calibrate import PACKED_BF16_MIN_ROWS, onednn_available, pick
from qru.kernels.dense import SMALL_MACS, DenseLinearFn

PATHS = ("torch", "bf16", "packed", "dense")
DEFAULT_PACKED_MAX_BYTES = 2 << 30


@functools.lru_cache(maxsize=None)
def packing_available() -> bool:
    """oneDNN's linear passes the calibration probe and torch has its weight packing."""
    return onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packed_max_bytes() -> int:
    """The budget of all packed weights of the process: ``QRU_PACKED_MAX_BYTES`` or 2 GiB."""
    raw = os.environ.get("QRU_PACKED_MAX_BYTES", "").strip()
    if not raw:
        return DEFAULT_PACKED_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"QRU_PACKED_MAX_BYTES={raw!r} is not a non-negative integer (bytes)")
    return value


_lock = threading.RLock()  # guards the slots' entries and the byte count (re-entrant: __del__ may run in GC)
_optimizer_steps = 0  # optimizer steps taken in this process (any torch.optim optimizer) since the hook
_step_hook = None  # the torch.optim post-step hook's handle, registered when a trainable weight is first packed


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _epoch(w: torch.Tensor):
    """What besides its version an update of ``w`` may change: the optimizer step count if ``w`` is
    trainable (fused optimizers do not bump ``_version``), else nothing. The counting hook is
    registered on the first call for a trainable weight, not at import: a process that never packs
    one never has it."""
    global _step_hook
    if not w.requires_grad:
        return None
    if _step_hook is None:
        with _lock:
            if _step_hook is None:
                _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    return _optimizer_steps


_packed_bytes = 0  # bytes held by all PackedWeight slots of the process


def packed_bytes() -> int:
    """Bytes currently held by packed weights (all slots of the process)."""
    return _packed_bytes


def _weights(w) -> tuple[torch.Tensor, ...]:
    return (w,) if isinstance(w, torch.Tensor) else tuple(w)


class PackedWeight:
    """A cache slot for one layer's oneDNN-packed weight (owned by the layer, e.g.
    ``qru.model.linear.Linear``), or for the packed concatenation of several weights of the same
    input (``weight`` a sequence: a fused projection, :func:`linear_group`). Holds at most one packed
    copy, valid while every weight is the same tensor with the same storage and in-place version.
    Copies (``copy.deepcopy``) and pickles of a layer get an empty slot. Thread-safe: concurrent
    callers may both pack, one copy is kept."""

    __slots__ = ("_entry", "_nbytes")

    def __init__(self):
        self._entry = None  # (((weakref, data_ptr, _version, _epoch) per weight), packed tensor)
        self._nbytes = 0

    @staticmethod
    def _key(ws) -> tuple:
        return tuple((weakref.ref(w), w.data_ptr(), w._version, _epoch(w)) for w in ws)

    def _valid(self, w) -> bool:
        e = self._entry
        if e is None:
            return False
        ws = _weights(w)
        return len(e[0]) == len(ws) and all(r() is t and p == t.data_ptr() and v == t._version and ep == _epoch(t)
                                            for (r, p, v, ep), t in zip(e[0], ws))

    def fits(self, w) -> bool:
        """Whether ``w`` (a weight, or a sequence of weights) is packed here already or a new packed
        copy fits the budget."""
        if self._valid(w):
            return True
        self.clear()  # stale: free it before anything else is packed
        return _packed_bytes + sum(t.numel() * t.element_size() for t in _weights(w)) <= packed_max_bytes()

    def get(self, w) -> torch.Tensor:
        """The packed copy of ``w`` (a weight, or a sequence of weights packed as their concatenation
        along the output dim), packed now if the slot holds none or a stale one."""
        if self._valid(w):
            return self._entry[1]
        ws = _weights(w)
        whole = ws[0].detach() if len(ws) == 1 else torch.cat([t.detach() for t in ws])
        entry = (self._key(ws), torch.ops.mkldnn._reorder_linear_weight(whole))
        del whole
        nbytes = sum(t.numel() * t.element_size() for t in ws)
        global _packed_bytes
        with _lock:
            self._drop()
            self._entry, self._nbytes = entry, nbytes
            _packed_bytes += nbytes
        return entry[1]

    def _drop(self) -> None:  # under _lock
        global _packed_bytes
        if self._entry is not None:
            self._entry = None
            _packed_bytes -= self._nbytes
            self._nbytes = 0

    def clear(self) -> None:
        """Drop the packed copy (if any)."""
        if self._entry is not None:
            with _lock:
                self._drop()

    @property
    def packed(self) -> bool:
        return self._entry is not None

    def __del__(self):
        try:
            self.clear()
        except Exception:  # interpreter shutdown
            pass

    def __deepcopy__(self, memo):
        return PackedWeight()

    def __reduce__(self):
        return (PackedWeight, ())

    def __repr__(self) -> str:
        return f"PackedWeight({'packed' if self.packed else 'empty'})"


def _needs_grad(x, weight, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _packable(x: torch.Tensor, rows: int, weight, bias_dtype_ok: bool, packed: PackedWeight) -> bool:
    """The packed path's common conditions: enough rows for the dtype, one torch thread, a bias (if
    any) of the operands' dtype, oneDNN packing here and picked by the calibration, and room in the
    budget (``weight``: one weight or a group)."""
    bf16 = x.dtype == torch.bfloat16
    return (rows > (PACKED_BF16_MIN_ROWS if bf16 else 1) and bias_dtype_ok and torch.get_num_threads() == 1
            and packing_available() and pick("packed_bf16" if bf16 else "packed_fp32") == "onednn"
            and packed.fits(weight))


def choose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None) -> str:
    """The path :func:`linear` takes for these operands now (one of :data:`PATHS`); see the module
    docstring. Raises when ``QRU_BACKEND`` forces a backend these operands cannot use."""
    forced = forced_backend()
    if forced == "triton" and not triton_usable(x):
        raise RuntimeError("QRU_BACKEND=triton needs a CUDA tensor or TRITON_INTERPRET=1")
    if forced == "cpp" and x.is_cuda:
        raise RuntimeError("QRU_BACKEND=cpp needs CPU tensors")
    if (forced in ("torch", "triton") or x.device.type != "cpu" or weight.device.type != "cpu"
            or weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.numel() == 0
            or torch.is_autocast_enabled("cpu")):
        return "torch"
    dt = x.dtype
    if dt == torch.bfloat16 and weight.dtype == torch.bfloat16 and not torch.is_grad_enabled():
        rows = x.numel() // x.shape[-1]
        if forced == "cpp" and rows <= skinny_rows():
            if load_cpp_ext("bf16_linear") is None:
                raise RuntimeError("QRU_BACKEND=cpp but the C++ kernel 'bf16_linear' is unavailable")
            return "bf16"
        if packed is not None and _packable(x, rows, weight, bias is None or bias.dtype == dt, packed):
            return "packed"
        return "bf16"
    if dt != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != dt):
        return "torch"
    if packed is not None and packed.packed and not packed._valid(weight):
        packed.clear()  # the weight changed since it was packed: free the copy now
    rows = x.numel() // x.shape[-1]
    if rows <= 1 or not onednn_available():
        return "torch"
    if packed is not None and not _needs_grad(x, weight, bias) and _packable(x, rows, weight, True, packed):
        return "packed"
    # the rule of qru.kernels.dense.use_onednn: with several threads only GEMMs large enough to share
    if ((torch.get_num_threads() == 1 or rows * weight.shape[0] * weight.shape[1] >= SMALL_MACS)
            and pick("dense_fp32") == "onednn"):
        return "dense"
    return "torch"


def linear_group(x: torch.Tensor, weights, biases, packed: PackedWeight) -> torch.Tensor | None:
    """``cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` as one GEMM on the packed
    concatenation of ``weights`` (held in ``packed``), or None where the ``"packed"`` path would not
    run for the concatenated weight: then the caller runs its layers one by one (a model's q/k/v
    or gate/up projections). One call instead of several: per-call overhead paid once, ``x`` read
    once. The packed copy replaces those of the single layers (it holds the same bytes), so the
    caller clears theirs. ``biases``: all None or all tensors."""
    ws = tuple(weights)
    dt = x.dtype
    if (forced_backend() is not None or x.device.type != "cpu" or dt not in (torch.float32, torch.bfloat16)
            or x.dim() == 0 or x.numel() == 0 or torch.is_autocast_enabled("cpu")
            or any(w.device.type != "cpu" or w.dtype != dt or w.dim() != 2 or w.shape[1] != x.shape[-1] for w in ws)):
        packed.clear()
        return None
    bs = tuple(biases)
    with_bias = bs[0] is not None
    if any((b is not None) != with_bias or (b is not None and b.dtype != dt) for b in bs):
        packed.clear()
        return None
    grad = (torch.is_grad_enabled() if dt == torch.bfloat16
            else any(_needs_grad(x, w, b) for w, b in zip(ws, bs)))
    rows = x.numel() // x.shape[-1]
    if grad or not _packable(x, rows, ws, True, packed):
        if packed.packed and not packed._valid(ws):
            packed.clear()
        return None
    b = torch.cat([t.detach() for t in bs]) if with_bias else None
    return torch.ops.mkldnn._linear_pointwise(x.detach(), packed.get(ws), b, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by the path :func:`choose` picks; differentiable wherever
    gradients are needed. ``packed``: the caller's cache slot for the packed weight (the
    ``"packed"`` path needs one; without it a no-grad fp32 call takes the dense path)."""
    path = choose(x, weight, bias, packed)
    if path == "torch":
        return F.linear(x, weight, bias)
    if path == "bf16":
        return bf16_linear(x, weight, bias)
    if path == "packed":
        b = None if bias is None else bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x.detach(), packed.get(weight), b, "none", [], "")
    x2 = x.reshape(-1, x.shape[-1])
    y = DenseLinearFn.apply(x2, weight, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])

"""qmatmul's Triton path under the interpreter (CUDA on a GPU): the fused kernel against the
reference on awkward shapes, the tensor-core operand path, every autotune configuration, and the
row cutoff that hands over to dequantize + F.linear. ``@gpu`` tests run the same on CUDA."""
import pytest
import torch

import qru.quant as Q
from qru.kernels import qmatmul
from test_qlinear import _packed, assert_linear_close

KINDS_4BIT = ("nf4", "fp4", "int4", "int4_sym")
HALF = [torch.bfloat16, torch.float16]
# (out, in): odd N; in not a multiple of the 32-block / tile (int4 kinds need even in)
SHAPES = {"nf4": [(33, 130), (7, 13)], "fp4": [(33, 130), (7, 13)],
          "int4": [(33, 130), (7, 14)], "int4_sym": [(33, 130), (7, 14)]}


def _q(fmt, shape, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5
    q = Q.quantize(w, fmt, 32)
    return q, *_packed(q)


@pytest.mark.parametrize("fmt", KINDS_4BIT)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fused_awkward_shapes(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    for i, (n, k) in enumerate(SHAPES[fmt]):
        q, data, scales, zeros = _q(fmt, (n, k), seed=i)
        w = q.dequantize(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        for m in (range(1, 18) if i == 0 else (1, 5, 16, 17)):
            x = torch.randn(m, k, generator=g).to(dtype)
            b = bias if m % 2 else None
            ref = qmatmul.quant_linear_reference(x, data, scales, zeros, fmt, 32, n, k, b)
            y = qmatmul._quant_linear_triton(x, data, scales, zeros, fmt, 32, n, b)
            assert_linear_close(y, ref, x, w)


@pytest.mark.parametrize("fmt", KINDS_4BIT)
def test_tensor_core_operands_fp16(fmt):
    """The half-precision ``tl.dot`` branch (taken on CUDA) under the interpreter: decoded tiles
    rounded to fp16 are exact in it, so it meets the same bound. (The interpreter's bf16
    ``tl.dot`` is wrong, so bf16 is left to the @gpu test.)"""
    n, k = SHAPES[fmt][0]
    q, data, scales, zeros = _q(fmt, (n, k), seed=3)
    g = torch.Generator().manual_seed(4)
    for m in (1, 7, 17):
        x = torch.randn(m, k, generator=g).half()
        ref = qmatmul.quant_linear_reference(x, data, scales, zeros, fmt, 32, n, k)
        y = qmatmul._quant_linear_triton(x, data, scales, zeros, fmt, 32, n, None, tc=True)
        assert_linear_close(y, ref, x, q.dequantize(torch.float16))


@pytest.mark.parametrize("cfg", qmatmul.QMM_CONFIGS, ids=lambda c: str(c.kwargs))
def test_every_autotune_config_runs(cfg):
    """Each GPU launch configuration, launched explicitly under the interpreter."""
    for fmt, dtype, tc in (("nf4", torch.bfloat16, False), ("int4", torch.float16, True)):
        n, k = 37, 200
        q, data, scales, zeros = _q(fmt, (n, k), seed=5)
        x = torch.randn(qmatmul.TRITON_FUSED_MAX_ROWS - 3, k, generator=torch.Generator().manual_seed(6)).to(dtype)
        ref = qmatmul.quant_linear_reference(x, data, scales, zeros, fmt, 32, n, k)
        y = qmatmul._quant_linear_triton(x, data, scales, zeros, fmt, 32, n, None, config=cfg, tc=tc)
        assert_linear_close(y, ref, x, q.dequantize(dtype))


def test_autotune_wraps_the_kernel():
    assert qmatmul._qmm_autotuned.fn is qmatmul._qmm_kernel
    assert qmatmul._qmm_autotuned.configs == qmatmul.QMM_CONFIGS
    assert all(c.kwargs["BM"] >= 16 for c in qmatmul.QMM_CONFIGS)  # tl.dot's minimum


def test_select_path_rule():
    cut, cpu_cut = qmatmul.TRITON_FUSED_MAX_ROWS, qmatmul.FUSED_MAX_ROWS
    assert [qmatmul.select_path("triton", m, False) for m in (1, cut, cut + 1)] == \
        ["triton_fused", "triton_fused", "dequant_linear"]
    assert [qmatmul.select_path("cpp", m, False) for m in (1, cpu_cut, cpu_cut + 1)] == \
        ["cpp_fused", "cpp_fused", "dequant_linear"]
    assert qmatmul.select_path("triton", 1, True) == "dequant_linear"
    assert qmatmul.select_path("torch", 1, False) == "reference"
    with pytest.raises(ValueError, match="backend"):
        qmatmul.select_path("cuda", 1, False)


def test_quant_linear_hands_over_above_cutoff(monkeypatch):
    """With Triton standing in for CUDA (interpreter): the fused kernel up to the cutoff, then
    dequantize + F.linear; both agree with the reference."""
    monkeypatch.setenv("QRU_BACKEND", "triton")
    calls = []
    orig = qmatmul._quant_linear_triton
    monkeypatch.setattr(qmatmul, "_quant_linear_triton", lambda *a, **k: calls.append(a[0].shape[0]) or orig(*a, **k))
    monkeypatch.setattr(qmatmul, "TRITON_FUSED_MAX_ROWS", 4)
    q, data, scales, zeros = _q("nf4", (9, 40), seed=7)
    for m in (4, 5):
        x = torch.randn(m, 40, dtype=torch.bfloat16)
        y = qmatmul.quant_linear(x, data, scales, zeros, "nf4", 32, 9, 40)
        ref = qmatmul.quant_linear_reference(x, data, scales, zeros, "nf4", 32, 9, 40)
        assert_linear_close(y, ref, x, q.dequantize(torch.bfloat16))
    assert calls == [4]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", qmatmul.FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_quant_linear_matches_reference(fmt, dtype):
    """On CUDA: both sides of the cutoff (autotuned fused kernel, dequantize + cuBLAS)."""
    n, k = 4096 + 7, 1024 + 32  # odd N, K not a multiple of the tiles
    q = Q.quantize(torch.randn(n, k) * 0.5, fmt, None if fmt == "int8" else 32)
    data, scales, zeros = (t.cuda() if t is not None else None for t in _packed(q))
    w = q.dequantize(dtype)
    for m in (1, 17, qmatmul.TRITON_FUSED_MAX_ROWS, qmatmul.TRITON_FUSED_MAX_ROWS + 1, 300):
        x = torch.randn(m, k).to(dtype)
        ref = qmatmul.quant_linear_reference(x, *_packed(q), fmt, q.block_size, n, k)
        y = qmatmul.quant_linear(x.cuda(), data, scales, zeros, fmt, q.block_size, n, k).cpu()
        # another summation order (the bound of assert_linear_close, x4), and for half types cuBLAS
        # may round split-K partial sums to the output dtype (allow_*_reduced_precision_reduction)
        bound = x.double().abs() @ w.double().abs().T
        u = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
        tol = 4 * k * 2.0 ** -23 * bound + u * ref.double().abs() + 4 * u * bound + 1e-30
        assert bool(((y.double() - ref.double()).abs() <= tol).all()), (fmt, dtype, m)

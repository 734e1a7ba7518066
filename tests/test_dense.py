"""qru.kernels.dense: oneDNN fp32 GEMMs against the fp64 product, on awkward shapes and strides."""
import pytest
import torch

from qru.kernels import dense
from qru.kernels.dense import dense_linear, dense_linear_reference, use_onednn

SHAPES = [(2, 1, 1), (7, 13, 5), (33, 17, 65), (130, 96, 257)]  # (M, N, K)


pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes take oneDNN only with one thread


@pytest.fixture(autouse=True)
def _onednn_picked(monkeypatch):
    """These tests check the oneDNN path, whatever this machine's calibration picked."""
    monkeypatch.setenv("QRU_DENSE_FP32", "onednn")


def _f64(x, w, bias=None, add=None):
    y = x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    if add is not None:
        y = y + add.double()
    return y


def _close(y, ref, K):
    # fp32 GEMM round-off grows with K; inputs are O(1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * K ** 0.5 * 4, rtol=1e-5)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("add", [False, True])
def test_matches_fp64(M, N, K, bias, add):
    g = torch.Generator().manual_seed(M * 1000 + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    a = torch.randn(M, N, generator=g) if add else None
    y = dense_linear(x, w, b, a)
    _close(y, _f64(x, w, b, a), K)


@pytest.mark.parametrize("M,N,K", SHAPES[1:])
def test_transposed_and_sliced_operands(M, N, K):
    """x W (weight passed as W.t()), Gᵀ X (both operands transposed views), row slices."""
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)  # y = x @ W
    _close(dense_linear(x, W.t()), x.double() @ W.double(), K)
    G, X = torch.randn(M, N, generator=g), torch.randn(M, K, generator=g)  # Gᵀ X: (N, K)
    _close(dense_linear(G.t(), X.t()), G.double().t() @ X.double(), M)
    big = torch.randn(M + 5, K, generator=g)
    w = torch.randn(N, K, generator=g)
    _close(dense_linear(big[3:3 + M], w), _f64(big[3:3 + M], w), K)


def test_accumulate_contract():
    """Callers use the return value; on the torch path ``accumulate`` adds into ``add`` in place."""
    g = torch.Generator().manual_seed(2)
    x, w, a = torch.randn(9, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(9, 4, generator=g)
    ref = _f64(x, w, add=a)
    a0 = a.clone()
    y = dense_linear_reference(x, w, add=a, accumulate=True)
    assert y.data_ptr() == a.data_ptr()
    _close(y, ref, 6)
    a = a0.clone()
    y = dense_linear(x, w, add=a, accumulate=True)
    _close(y, ref, 6)
    y2 = dense_linear(x, w, add=a0.clone())  # no accumulate: the add operand is untouched
    _close(y2, ref, 6)


def test_dispatch(monkeypatch):
    """oneDNN for fp32 CPU with > 1 row (when torch has it); torch for one row, other dtypes,
    and under QRU_BACKEND=torch. The torch path is exactly addmm/mm."""
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert use_onednn(x, w) == dense.onednn_available()
        torch.set_num_threads(2)  # several threads: small GEMMs stay with torch, large ones do not
        assert not use_onednn(x, w)
        big = torch.empty(256, 256)
        assert use_onednn(big, big) == dense.onednn_available()
    finally:
        torch.set_num_threads(threads)
    assert not use_onednn(x[:1], w)
    assert not use_onednn(x.bfloat16(), w.bfloat16())
    monkeypatch.setenv("QRU_DENSE_FP32", "torch")  # the calibration's pick (here: overridden)
    assert not use_onednn(x, w)
    monkeypatch.setenv("QRU_DENSE_FP32", "onednn")
    monkeypatch.setenv("QRU_BACKEND", "torch")
    assert not use_onednn(x, w)
    assert torch.equal(dense_linear(x, w), torch.mm(x, w.t()))
    xb, wb = x.bfloat16(), w.bfloat16()
    monkeypatch.delenv("QRU_BACKEND")
    assert torch.equal(dense_linear(xb, wb), torch.mm(xb, wb.t()))
    assert torch.equal(dense_linear(x[:1], w), torch.mm(x[:1], w.t()))


def test_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(3, 6\)"):
        dense_linear(torch.randn(4, 5), torch.randn(3, 6))


def test_onednn_used_when_available():
    """Where torch ships oneDNN (x86 and arm64 CPU builds), the fast path is really taken."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert dense.onednn_available()


@pytest.mark.parametrize("shape", [(7, 13), (2, 3, 13)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_autograd_matches_fp64(shape, bias):
    """DenseLinearFn (the dispatch's "dense" path): output and dX, dW, db against fp64 F.linear autograd."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(11, 13, generator=g, requires_grad=True)
    b = torch.randn(11, generator=g, requires_grad=True) if bias else None
    gy = torch.randn(*shape[:-1], 11, generator=g)
    y = dense.DenseLinearFn.apply(x.reshape(-1, 13), w, b).view(*shape[:-1], 11)
    y.backward(gy)
    leaves = [x, w] + ([b] if bias else [])
    got = [t.grad.clone() for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    yr = torch.nn.functional.linear(*ref_leaves[:2], ref_leaves[2] if bias else None)
    yr.backward(gy.double())
    _close(y.detach(), yr.detach(), 13)
    for a, r in zip(got, ref_leaves):
        _close(a, r.grad, 13)

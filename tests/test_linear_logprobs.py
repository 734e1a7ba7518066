"""Fused lm_head + log-softmax + gather (qru.kernels.linear_logprobs) against the plain-autograd
reference (full logits, fp32 log_softmax, gather) and against fp64, on every backend: C++ (AVX2 and
scalar), Triton (interpreter on CPU), torch; W frozen (the eager-gradient path) and W trainable
(the recompute path); chunking, ignored rows, bf16, autocast; the loss-level wrapper against
``sequence_logprobs``."""
import pytest
import torch

from qru.kernels import linear_logprobs as LLP
from qru.kernels.linear_logprobs import linear_logprobs, linear_logprobs_reference
from qru.train import losses as L
from cpp_helpers import need_cpp, use_backend

BACKENDS = ["torch", "triton", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return use_backend(monkeypatch, request.param, "linear_logprobs")


def make(N=37, H=24, V=150, dtype=torch.float32, seed=0, wgrad=False, ignore=(3, 10)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_(wgrad)
    y = torch.randint(0, V, (N,), generator=g)
    for i in ignore:
        y[i] = -100
    up = torch.randn(N, generator=g)
    return h, W, y, up


def grads(fn, h, W, y, up, **kw):
    h.grad = None
    W.grad = None
    lp = fn(h, W, y, **kw)
    (lp * up).sum().backward()
    return lp.detach(), h.grad.clone(), (W.grad.clone() if W.requires_grad else None)


def assert_reference_grads(lp, dh, dw, h, W, y, up, dtype):
    """log-probs and both gradients equal linear_logprobs_reference's (bf16: to bf16 round-off)."""
    rlp, rdh, rdw = grads(linear_logprobs_reference, h, W, y, up)
    t = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.float(), rdh.float(), **t)
    torch.testing.assert_close(dw.float(), rdw.float(), **t)


@pytest.mark.parametrize("wgrad", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_matches_reference_fp32(backend, wgrad, chunk):
    h, W, y, up = make(wgrad=wgrad)
    lp, dh, dw = grads(linear_logprobs, h, W, y, up, chunk_size=chunk)
    rlp, rdh, rdw = grads(linear_logprobs_reference, h, W, y, up)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, rdh, rtol=1e-5, atol=1e-5)
    if wgrad:
        torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5)
    assert (lp[[3, 10]] == 0).all() and (dh[[3, 10]] == 0).all()


@pytest.mark.parametrize("wgrad", [False, True])
def test_against_fp64(backend, wgrad):
    """Independent of the fp32 reference: the same math in float64 by hand."""
    h, W, y, up = make(N=20, H=16, V=77, wgrad=wgrad, ignore=(0,))
    lp, dh, dw = grads(linear_logprobs, h, W, y, up, chunk_size=6)
    h64, W64 = h.detach().double(), W.detach().double()
    z = h64 @ W64.T
    p = z.softmax(-1)
    valid = y != -100
    yc = y.clamp(min=0)
    want = torch.where(valid, z.gather(1, yc[:, None])[:, 0] - z.logsumexp(-1), torch.zeros(()).double())
    D = (torch.nn.functional.one_hot(yc, 77).double() - p) * (up.double() * valid)[:, None]
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double(), D @ W64, rtol=1e-4, atol=1e-5)
    if wgrad:
        torch.testing.assert_close(dw.double(), D.T @ h64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wgrad", [False, True])
def test_bf16(backend, wgrad):
    h, W, y, up = make(dtype=torch.bfloat16, wgrad=wgrad)
    lp, dh, dw = grads(linear_logprobs, h, W, y, up, chunk_size=8)
    rlp, rdh, rdw = grads(linear_logprobs_reference, h, W, y, up)
    assert lp.dtype == torch.float32 and dh.dtype == torch.bfloat16
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 softmax
    torch.testing.assert_close(dh.float(), rdh.float(), rtol=2e-2, atol=2e-2)
    if wgrad:
        assert dw.dtype == torch.bfloat16
        torch.testing.assert_close(dw.float(), rdw.float(), rtol=2e-2, atol=2e-2)


def test_large_logits_and_wide_vocab(backend):
    """Logits far from 0 (the max-shift matters), V spanning many row blocks, an odd tail."""
    h, W, y, up = make(N=9, H=8, V=1003, ignore=())
    with torch.no_grad():
        W.mul_(40)
    lp, dh, _ = grads(linear_logprobs, h, W, y, up, chunk_size=4)
    rlp, rdh, _ = grads(linear_logprobs_reference, h, W, y, up)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dh, rdh, rtol=1e-4, atol=1e-4)


def test_cpp_scalar_path_equals_avx2():
    ext = need_cpp("linear_logprobs")
    g = torch.Generator().manual_seed(3)
    z = torch.randn(13, 203, generator=g) * 5
    y = torch.randint(0, 203, (13,), generator=g)
    y[2] = -100
    lse_v, lp_v = ext.lse_gather(z.clone(), y, -100, False, False)
    lse_s, lp_s = ext.lse_gather(z.clone(), y, -100, False, True)
    torch.testing.assert_close(lse_v, lse_s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp_v, lp_s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse_v, z.logsumexp(-1), rtol=1e-6, atol=1e-6)
    zs, zv = z.clone(), z.clone()
    ext.lse_gather(zv, y, -100, True, False)
    ext.lse_gather(zs, y, -100, True, True)
    want = torch.nn.functional.one_hot(y.clamp(min=0), 203).float() - z.softmax(-1)
    want[2] = 0
    torch.testing.assert_close(zv, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zs, want, rtol=1e-5, atol=1e-6)
    gup = torch.randn(13, generator=g)
    d1, d2 = z.clone(), z.clone()
    ext.dlogits_(d1, y, lse_v, gup, -100, False)
    ext.dlogits_(d2, y, lse_v, gup, -100, True)
    torch.testing.assert_close(d1, want * gup[:, None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d2, want * gup[:, None], rtol=1e-5, atol=1e-6)


def test_autocast_matches_bf16_linear(backend):
    """Under CPU bf16 autocast the projection runs in bf16 like F.linear would."""
    h, W, y, up = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = linear_logprobs(h, W, y)
        rlp = linear_logprobs_reference(h, W, y)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    (lp * up).sum().backward()
    assert h.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()


def test_leading_dims_and_no_grad(backend):
    h, W, y, _ = make(N=24)
    with torch.no_grad():
        lp = linear_logprobs(h.view(4, 6, -1), W, y.view(4, 6))
    assert lp.shape == (4, 6) and not lp.requires_grad
    torch.testing.assert_close(lp.reshape(-1), linear_logprobs_reference(h, W, y).detach(), rtol=1e-5, atol=1e-5)


def test_default_chunk_bounds_the_block():
    assert LLP.default_chunk(10_000, 32000, torch.device("cpu")) * 32000 * 4 <= LLP.CPU_CHUNK_BYTES
    assert LLP.default_chunk(3, 32000, torch.device("cpu")) == 3
    assert LLP.default_chunk(10, 10**9, torch.device("cpu")) == 1


def test_errors():
    h, W, y, _ = make()
    with pytest.raises(ValueError, match="label 150 is outside"):
        linear_logprobs(h, W, torch.full_like(y, 150))
    with pytest.raises(ValueError, match="label -5"):
        linear_logprobs(h, W, torch.full_like(y, -5))
    with pytest.raises(ValueError, match="features"):
        linear_logprobs(h[:, :5], W, y)
    with pytest.raises(ValueError, match="labels shape"):
        linear_logprobs(h, W, y[:-1])
    with pytest.raises(TypeError, match="bfloat16"):
        linear_logprobs(h, W.bfloat16(), y)
    with pytest.raises(TypeError, match="integers"):
        linear_logprobs(h, W, y.float())
    with pytest.raises(ValueError, match="chunk_size"):
        linear_logprobs(h, W, y, chunk_size=0)


@pytest.mark.parametrize("wgrad", [False, True])
def test_hidden_sequence_logprobs_equals_logits_path(wgrad):
    """The loss-level wrapper: same sums and counts (and gradients) as sequence_logprobs on logits,
    with a ragged loss mask (prompt tokens and right padding not targets)."""
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 3, 11, 16, 90
    hid = torch.randn(B, T, H, generator=g).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.5).requires_grad_(wgrad)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, 7:] = 0
    mask[2, :] = 0
    mask[2, 5] = 1
    s, n = L.hidden_sequence_logprobs(hid, W, ids, mask, chunk_size=4)
    rs, rn = L.sequence_logprobs(hid @ W.T, ids, mask)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-5)
    assert torch.equal(n, rn)
    (s * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    gh, gw = hid.grad.clone(), (W.grad.clone() if wgrad else None)
    hid.grad = None
    W.grad = None
    (rs * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    torch.testing.assert_close(gh, hid.grad, rtol=1e-5, atol=1e-6)
    if wgrad:
        torch.testing.assert_close(gw, W.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("wgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_reference(wgrad, dtype):
    h, W, y, up = make(N=300, H=64, V=5000, dtype=dtype, wgrad=wgrad)
    h, W, y, up = (t.detach().cuda() for t in (h, W, y, up))
    h.requires_grad_()
    W.requires_grad_(wgrad)
    lp, dh, dw = grads(linear_logprobs, h, W, y, up, chunk_size=128)
    rlp, rdh, rdw = grads(linear_logprobs_reference, h, W, y, up)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lp, rlp, rtol=tol, atol=tol)
    torch.testing.assert_close(dh.float(), rdh.float(), rtol=tol, atol=tol)
    if wgrad:
        torch.testing.assert_close(dw.float(), rdw.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("wgrad", [False, True])
def test_no_rows(backend, wgrad):
    h, W, y, _ = make(N=0, ignore=())
    W.requires_grad_(wgrad)
    lp = linear_logprobs(h, W, y)
    assert lp.shape == (0,)
    lp.sum().backward()
    assert h.grad.shape == (0, 24)
    if wgrad:
        assert torch.equal(W.grad, torch.zeros_like(W))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_weight_gradient_no_recompute(backend, dtype, monkeypatch):
    """Trainable W, rows in groups with a per-group constant upstream gradient (per-sequence sums):
    the grouped strategy gives the reference gradients without recomputing the logits."""
    h, W, y, _ = make(N=30, dtype=dtype, wgrad=True, ignore=(4,))
    sizes = torch.tensor([7, 0, 12, 11])
    c = torch.tensor([0.5, 9.0, -1.5, 2.0])
    up = c.repeat_interleave(sizes)

    def boom(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(LLP.LinearLogprobsFn, "_recompute", staticmethod(boom))
    monkeypatch.setattr(LLP.LinearLogprobsFn, "_stored", staticmethod(boom))
    monkeypatch.setattr(LLP, "STORED_BYTES", 0)  # the grouped strategy, not the stored one
    lp, dh, dw = grads(linear_logprobs, h, W, y, up, chunk_size=8, group_sizes=sizes)
    monkeypatch.undo()
    assert_reference_grads(lp, dh, dw, h, W, y, up, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_skips_a_group_of_ignored_rows(backend, dtype, monkeypatch):
    """The padding rows (all ignored, a group of their own) add nothing to dW: no GEMM touches
    them, and the gradients still equal the reference's."""
    h, W, y, _ = make(N=30, dtype=dtype, wgrad=True, ignore=(4, *range(22, 30)))
    sizes = torch.tensor([10, 12, 8])  # the last group: rows 22..29, all ignored
    up = torch.tensor([0.5, -1.5, 3.0]).repeat_interleave(sizes)
    monkeypatch.setattr(LLP, "STORED_BYTES", 0)  # the grouped strategy
    calls = []
    real_dense = LLP.dense_linear
    monkeypatch.setattr(LLP, "dense_linear", lambda x, w, *a, **k: calls.append(w) or real_dense(x, w, *a, **k))
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda x, w, *a, **k: calls.append(w) or real_mm(x, w, *a, **k))
    lp, dh, dw = grads(linear_logprobs, h, W, y, up, chunk_size=8, group_sizes=sizes)
    monkeypatch.setattr(LLP, "dense_linear", real_dense)
    monkeypatch.setattr(torch, "mm", real_mm)
    dead = h[22:].detach()
    assert calls and not any(w.dim() == 2 and dead.data_ptr() <= w.data_ptr() < dead.data_ptr() + dead.nbytes
                             for w in calls), "a GEMM read the ignored group's rows"
    rlp, rdh, rdw = grads(linear_logprobs_reference, h, W, y, up)
    t = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(dh.float(), rdh.float(), **t)
    torch.testing.assert_close(dw.float(), rdw.float(), **t)
    # every group ignored: dW is zero, with no partial at all
    y_all = torch.full_like(y, -100)
    lp, dh, dw = grads(linear_logprobs, h, W, y_all, up, chunk_size=8, group_sizes=sizes)
    assert torch.equal(dw, torch.zeros_like(W)) and torch.equal(lp, torch.zeros_like(lp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [8, 64])
def test_stored_weight_gradient_any_upstream(backend, dtype, chunk, monkeypatch):
    """Trainable W and room for the (N, V) unit gradients: the stored strategy gives the reference
    gradients for any upstream gradient (not constant per group), without recomputing the logits."""
    h, W, y, up = make(N=30, dtype=dtype, wgrad=True, ignore=(4, 17))

    def boom(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(LLP.LinearLogprobsFn, "_recompute", staticmethod(boom))
    lp, dh, dw = grads(linear_logprobs, h, W, y, up, chunk_size=chunk)
    monkeypatch.undo()
    assert_reference_grads(lp, dh, dw, h, W, y, up, dtype)
    assert dw.dtype == W.dtype


def test_stored_under_autocast_matches_autocast_reference(backend):
    """fp32 weights under bf16 autocast (what training at precision bf16 runs): the kept unit
    gradients are bf16; the gradients agree with the reference's under the same autocast."""
    if backend == "triton":
        pytest.skip("CPU autocast")
    h, W, y, up = make(N=40, wgrad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, dh, dw = grads(linear_logprobs, h, W, y, up, chunk_size=16)
        rlp, rdh, rdw = grads(linear_logprobs_reference, h, W, y, up)
    assert dw.dtype == torch.float32 and dh.dtype == torch.float32
    torch.testing.assert_close(lp, rlp, rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(dh, rdh, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(dw, rdw, rtol=3e-2, atol=3e-2)


def test_grouped_falls_back_when_gradient_varies_or_budget_small(backend, monkeypatch):
    h, W, y, up = make(N=30, wgrad=True)
    sizes = torch.tensor([10, 20])
    rlp, rdh, rdw = grads(linear_logprobs_reference, h, W, y, up)
    lp, dh, dw = grads(linear_logprobs, h, W, y, up, chunk_size=8, group_sizes=sizes)  # g varies in a group
    torch.testing.assert_close(dh, rdh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(LLP, "GROUPED_BYTES", 10)
    up2 = torch.tensor([1.0, -2.0]).repeat_interleave(sizes)
    rlp, rdh, rdw = grads(linear_logprobs_reference, h, W, y, up2)
    lp, dh, dw = grads(linear_logprobs, h, W, y, up2, chunk_size=8, group_sizes=sizes)
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="group_sizes"):
        linear_logprobs(h, W, y, group_sizes=torch.tensor([3, 4]))


@pytest.mark.parametrize("V", [1, 50, 4097], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_tile_under_interpreter(V, dtype):
    """Both row kernels with the tile the GPU launches with (the whole row up to 4096 columns, then
    4096-wide tiles), under the interpreter, on awkward widths; against the torch row ops."""
    from qru.kernels._triton_io import gpu_row_block

    g = torch.Generator().manual_seed(V)
    z = (torch.randn(4, V, generator=g) * 4).to(dtype)
    y = torch.randint(0, V, (4,), generator=g)
    y[1] = -100  # an ignored row
    gw = torch.randn(4, generator=g)
    b = gpu_row_block(V)
    lse, logp = LLP._rows_lse_triton(z, y, -100, block_v=b)
    rlse, rlogp = LLP._rows_lse_torch(z, y, -100)
    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, rlogp, rtol=1e-5, atol=1e-5)
    dz = LLP._rows_dlogits_triton(z.clone(), y, rlse, gw, -100, block_v=b)
    rdz = LLP._rows_dlogits_torch(z.clone(), y, rlse, gw, -100)
    t = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dz.float(), rdz.float(), **t)

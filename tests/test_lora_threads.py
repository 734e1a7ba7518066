"""The LoRA linear on CPU at several torch thread counts: the thin rank-r work runs on one thread
(a busy core cannot stall it), the base GEMMs at the caller's count, and the results match the
plain-autograd reference and do not depend on the thread count (awkward shapes, dropout, bf16)."""
import pytest
import torch

from qru.kernels import lora as K
from cpp_helpers import use_backend
from test_lora_kernels import TOL, make, nf4_of, reference, rel_err

# (tokens, in, out, r): odd token counts, in/out not multiples of 8 or 16, ranks 1/3/16/64, and
# enough work (M·in·r >= 2^16) that the C++ kernels and torch really split it across threads.
SHAPES = [(301, 515, 33, 1), (67, 1027, 41, 3), (67, 257, 130, 16), (129, 100, 75, 64)]


@pytest.fixture(params=["cpp", "torch"])
def cpu_backend(request, monkeypatch):
    return use_backend(monkeypatch, request.param, "lora")


@pytest.fixture
def pinned_base(monkeypatch):
    """The frozen-base GEMMs (torch's/MKL's, which splits K at 2+ threads for some skinny shapes,
    e.g. 67x1027 @ 1027x41) held to one thread, so any difference left is this op's own work."""
    dense = K.dense_linear

    def one(*a, **k):
        with K.one_thread():
            return dense(*a, **k)
    monkeypatch.setattr(K, "dense_linear", one)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def want_of(x, W, b, A, B, scale, gy, p, **kw):
    """The reference (y, dX, dA, dB), with the dropout mask ``run`` samples at ``p``."""
    mask, keep = (None, 1.0)
    if p:
        mask, keep = K.make_dropout_mask(tuple(x.shape), p, "cpu", torch.Generator().manual_seed(11))
    return reference(x, W, b, A, B, scale, gy, mask=mask, keep=keep, **kw)


def assert_same_across_threads(got, label):
    """``got`` maps thread counts to (y, dX, dA, dB); every count gives 1 thread's bits."""
    for t in got:
        for name, a, c in zip(("y", "dX", "dA", "dB"), got[1], got[t]):
            assert torch.equal(a, c), f"{label}: {name} at {t} threads differs from 1 thread"


def assert_close_to(got, want, tol, label):
    for name, g, w in zip(("y", "dX", "dA", "dB"), got, want):
        assert rel_err(g, w) <= tol, f"{label} {name}: {rel_err(g, w):.2e}"


def run(x, W, b, A, B, scale, gy, threads, **kw):
    """(y, dX, dA, dB) at ``threads`` torch threads; sampled dropout from a fixed generator seed."""
    torch.set_num_threads(threads)
    x, A, B = (t.clone().requires_grad_() for t in (x, A, B))
    y = K.lora_linear(x, W, b, A, B, scale, generator=torch.Generator().manual_seed(11), **kw)
    return (y,) + torch.autograd.grad(y, (x, A, B), gy.to(y.dtype))


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_reference_at_1_2_3_threads(cpu_backend, restore_threads, shape, p):
    M, n_in, n_out, r = shape
    x, W, b, A, B = make(M, n_in, n_out, r, torch.float32, bias=True, seed=r)
    gy = torch.randn(M, n_out, generator=torch.Generator().manual_seed(1))
    want = want_of(x, W, b, A, B, 0.75, gy, p)
    for t in (1, 2, 3):
        got = run(x, W, b, A, B, 0.75, gy, t, dropout_p=p, training=True)
        assert_close_to(got, want, TOL[torch.float32], f"{cpu_backend} {shape} p{p} t{t}")


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_bitwise_same_at_1_2_3_threads(cpu_backend, pinned_base, restore_threads, shape, p):
    M, n_in, n_out, r = shape
    x, W, b, A, B = make(M, n_in, n_out, r, torch.float32, bias=True, seed=r)
    gy = torch.randn(M, n_out, generator=torch.Generator().manual_seed(1))
    got = {t: run(x, W, b, A, B, 0.75, gy, t, dropout_p=p, training=True) for t in (1, 2, 3)}
    assert_same_across_threads(got, f"{cpu_backend} {shape} p{p}")


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_bf16_autocast_same_at_1_2_3_threads(cpu_backend, pinned_base, restore_threads, p):
    M, n_in, n_out, r = 67, 257, 130, 16
    x, W, b, A, B = make(M, n_in, n_out, r, torch.float32, bias=True)
    gy = torch.randn(M, n_out, generator=torch.Generator().manual_seed(1))
    got = {}
    for t in (1, 2, 3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got[t] = run(x, W, b, A, B, 0.5, gy, t, dropout_p=p, training=True)
    assert got[1][0].dtype == torch.bfloat16
    assert_same_across_threads(got, f"{cpu_backend} bf16 p{p}")
    assert_close_to(got[1], want_of(x, W, b, A, B, 0.5, gy, p), TOL[torch.bfloat16], f"{cpu_backend} bf16 p{p}")


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_thin_work_on_one_thread_base_gemms_on_all(cpu_backend, restore_threads, monkeypatch, p):
    """Every torch GEMM the op itself calls (the rank-r products) sees one thread; the frozen-base
    GEMMs (dense_linear) see the caller's count, which is restored afterwards."""
    seen = {"thin": [], "base": []}

    def spy(fn, kind):
        def call(*a, **k):
            seen[kind].append(torch.get_num_threads())
            return fn(*a, **k)
        return call

    for name in ("mm", "addmm"):
        monkeypatch.setattr(torch, name, spy(getattr(torch, name), "thin"))
    monkeypatch.setattr(K, "dense_linear", spy(K.dense_linear, "base"))
    x, W, b, A, B = make(67, 257, 130, 16, torch.float32, bias=True)
    gy = torch.randn(67, 130, generator=torch.Generator().manual_seed(1))
    run(x, W, b, A, B, 0.5, gy, 2, dropout_p=p, training=True)
    assert torch.get_num_threads() == 2
    assert seen["thin"] and set(seen["thin"]) == {1}, seen
    assert seen["base"] == [2, 2], seen


def test_one_thread_restores_the_count_on_error(restore_threads):
    torch.set_num_threads(3)
    with pytest.raises(RuntimeError, match="inside"):
        with K.one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 3
    torch.set_num_threads(1)
    with K.one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_nf4_base_same_at_1_2_3_threads(cpu_backend, pinned_base, restore_threads, p):
    """QLoRA: the NF4 base (bitsandbytes-quantized, test-only peer) decoded per call, thin work
    and gradients bit-identical across thread counts and equal to the reference on the decoded base."""
    M, n_in, n_out, r = 67, 257, 130, 16
    x, W, b, A, B = make(M, n_in, n_out, r, torch.float32, bias=True)
    nf4 = nf4_of(W)
    gy = torch.randn(M, n_out, generator=torch.Generator().manual_seed(1))
    got = {t: run(x, None, b, A, B, 0.5, gy, t, dropout_p=p, training=True, nf4=nf4) for t in (1, 2, 3)}
    assert_same_across_threads(got, f"{cpu_backend} nf4 p{p}")
    assert_close_to(got[1], want_of(x, None, b, A, B, 0.5, gy, p, nf4=nf4), TOL[torch.float32],
                    f"{cpu_backend} nf4 p{p}")

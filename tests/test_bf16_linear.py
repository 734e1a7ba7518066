"""bf16 CPU inference linear (qru.kernels.bf16_linear) against float64 and torch's bf16 F.linear:
the C++ skinny kernel (every implementation built on this CPU: AVX512-BF16, AVX2, scalar; tails in
M, N and K; the prefetching paths), the GEMM path for many rows, bias, fallbacks, and the
model-level swap (Llama bf16 inference equals the plain-linear model)."""
import pytest
import torch
import torch.nn.functional as F

from qru.kernels import bf16_linear as BL
from qru.kernels._backend import load_cpp_ext


def ext():
    e = load_cpp_ext("bf16_linear")
    if e is None:
        pytest.skip("no C++ compiler")
    return e


def data(M, K, N, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(N, K, generator=g) / K ** 0.5).bfloat16()
    b = torch.randn(N, generator=g).bfloat16() if bias else None
    return x, w, b


def exact(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def within_one_rounding(y, x, w, b):
    """|y - exact| <= half a bf16 ulp of exact, plus fp32 accumulation slack."""
    e = exact(x, w, b)
    bound = e.abs() * 2.0 ** -8 + 1e-5 * (x.double().abs() @ w.double().abs().T)
    assert torch.all((y.double() - e).abs() <= bound)


def impls():
    e = load_cpp_ext("bf16_linear")
    return list(e.impls()) if e is not None else ["scalar"]


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("M", [1, 3, 8, 13, 16])
@pytest.mark.parametrize("K", [8, 37, 512, 1100])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_kernel_vs_fp64(impl, M, K, bias):
    e = ext()
    x, w, b = data(M, K, 67, bias)
    y = e.skinny_linear(x, w, b, impl=impl)
    assert y.dtype == torch.bfloat16 and y.shape == (M, 67)
    within_one_rounding(y, x, w, b)
    torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("N, K", [(333, 64), (41, 2200)])
def test_skinny_kernel_prefetching_shapes(impl, N, K):
    """Weights long enough that tiles prefetch ahead (short rows: two tiles; long rows: within the
    row), with an N tail; every output column checked."""
    e = ext()
    x, w, b = data(8, K, N, bias=True, seed=3)
    within_one_rounding(e.skinny_linear(x, w, b, impl=impl), x, w, b)


def test_skinny_kernel_impls_agree_and_bad_impl():
    e = ext()
    x, w, _ = data(5, 300, 19, seed=1)
    ys = [e.skinny_linear(x, w, impl=i) for i in e.impls()]
    assert e.impls()[-1] == "scalar"
    assert torch.equal(e.skinny_linear(x, w), ys[0])  # "auto" is the first (best) one
    for y in ys[1:]:  # fp32 sums in different orders: equal or one bf16 rounding apart
        torch.testing.assert_close(y.float(), ys[0].float(), rtol=2 ** -7, atol=1e-6)
    with pytest.raises(RuntimeError, match="impl 'nope' is not built"):
        e.skinny_linear(x, w, impl="nope")


@pytest.mark.parametrize("M", [2, 40])
def test_public_entry_paths(M):
    x, w, b = data(M, 64, 33, bias=True)
    with torch.no_grad():
        y = BL.bf16_linear(x.view(1, M, 64), w, b)
    assert y.shape == (1, M, 33) and y.dtype == torch.bfloat16
    within_one_rounding(y.view(M, 33), x, w, b)


def test_fallbacks_are_f_linear():
    x, w, b = data(4, 32, 9, bias=True)
    xr = x.clone().requires_grad_()
    assert torch.equal(BL.bf16_linear(xr, w, b), F.linear(xr, w, b))  # gradients wanted
    with torch.no_grad():
        assert torch.equal(BL.bf16_linear(x.float(), w.float(), b.float()), F.linear(x.float(), w.float(), b.float()))


def test_llama_bf16_inference_matches_plain_linears(monkeypatch):
    from qru.model.config import LlamaConfig
    from qru.model.generate import generate_ids
    from qru.model.llama import Llama

    torch.manual_seed(0)
    m = Llama(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64)).bfloat16().eval()
    ids = torch.randint(0, 101, (3, 7))
    with torch.no_grad():
        fast = m(ids).float()
        out_fast = generate_ids(m, ids, max_new_tokens=5)
    monkeypatch.setenv("QRU_BACKEND", "torch")  # the linear dispatch takes F.linear
    with torch.no_grad():
        plain = m(ids).float()
        out_plain = generate_ids(m, ids, max_new_tokens=5)
    torch.testing.assert_close(fast, plain, rtol=3e-2, atol=3e-2)
    assert (out_fast == out_plain).float().mean() > 0.8  # greedy paths may part only after a near-tie

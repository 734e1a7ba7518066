"""qru.kernels.causal_attention: the C++ kernel (vector and scalar paths) against the fp32
reference and an fp64 SDPA, fp32 and bf16, awkward shapes and strides; dispatch rules."""
import pytest
import torch
import torch.nn.functional as F

from qru.kernels._backend import load_cpp_ext
from qru.kernels.causal_attention import causal_attention, causal_attention_reference
from cpp_helpers import need_cpp

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2)}
SHAPES = [(1, 1, 1, 1, 16), (2, 4, 2, 17, 32), (1, 8, 4, 100, 32), (2, 6, 3, 33, 48), (1, 2, 2, 9, 5),
          (1, 2, 1, 16, 16), (1, 3, 3, 24, 16), (1, 2, 2, 40, 128)]


def _ext():
    ext = need_cpp("attention")
    return ext


def _inputs(B, H, KV, T, D, dtype, seed=0):
    """q as the model makes it (a (B, T, H, D) buffer seen as (B, H, T, D)); k, v slices of a longer cache."""
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, T, H, D, generator=g)).to(dtype).transpose(1, 2)
    k = (2 * torch.randn(B, KV, T + 7, D, generator=g)).to(dtype)[:, :, :T]
    v = torch.randn(B, KV, T + 7, D, generator=g).to(dtype)[:, :, :T]
    return q, k, v


def _oracle(q, k, v):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,KV,T,D", SHAPES)
@pytest.mark.parametrize("scalar", [False, True])
def test_cpp_matches_reference_and_sdpa(dtype, B, H, KV, T, D, scalar):
    ext = _ext()
    q, k, v = _inputs(B, H, KV, T, D, dtype)
    got = ext.causal_attn(q, k, v, D ** -0.5, scalar)
    assert got.dtype == dtype and got.shape == (B, H, T, D)
    assert got.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory: the model's reshape is a view
    torch.testing.assert_close(got.float(), causal_attention_reference(q, k, v).float(), **TOL[dtype])
    torch.testing.assert_close(got.double(), _oracle(q, k, v), **TOL[dtype], check_dtype=False)


def test_vector_path_reported():
    ext = _ext()
    assert not ext.causal_attn_vectorized(5) and not ext.causal_attn_vectorized(24)
    assert ext.causal_attn_vectorized(32) == ext.causal_attn_vectorized(128)


def test_large_scores_stay_finite():
    """Peaked rows (scores ~1e3) exercise the running-max rescale: no overflow, the oracle's answer."""
    ext = _ext()
    q, k, v = _inputs(1, 2, 1, 70, 32, torch.float32, seed=3)
    q = q * 40
    got = ext.causal_attn(q, k, v, 32 ** -0.5, False)
    assert torch.isfinite(got).all()
    ref = _oracle(q, k, v)
    sdpa32 = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fp32 round-off grows with the scores
    assert (got.double() - ref).abs().max() <= 2 * (sdpa32.double() - ref).abs().max() + 1e-6


def test_dispatch_uses_kernel_without_grad_and_sdpa_with_grad():
    _ext()
    q, k, v = _inputs(2, 4, 2, 19, 32, torch.float32)
    with torch.no_grad():
        fast = causal_attention(q, k, v)
    if load_cpp_ext("attention").causal_attn_vectorized(32):
        assert fast.transpose(1, 2).is_contiguous()  # the kernel's layout
    qg = q.detach().clone().requires_grad_(True)
    slow = causal_attention(qg, k, v)
    assert slow.grad_fn is not None  # autograd goes through SDPA
    torch.testing.assert_close(fast, slow.detach(), **TOL[torch.float32])
    slow.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_torch_backend_is_sdpa(monkeypatch):
    q, k, v = _inputs(2, 4, 2, 9, 16, torch.float32)
    monkeypatch.setenv("QRU_BACKEND", "torch")
    with torch.no_grad():
        got = causal_attention(q, k, v)
        assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_bad_shapes_named():
    q = torch.randn(2, 3, 5, 16)
    k = torch.randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match=r"H a multiple of KV"):
        causal_attention(q, k, k)
    with pytest.raises(ValueError, match=r"\(B, KV, T, D\)"):
        causal_attention(torch.randn(2, 4, 5, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16))
    ext = _ext()
    with pytest.raises(RuntimeError, match="shapes do not match"):
        ext.causal_attn(torch.randn(1, 2, 4, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16), 0.25)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ext.causal_attn(torch.randn(1, 2, 4, 16), torch.randn(1, 1, 4, 16).bfloat16(), torch.randn(1, 1, 4, 16), 0.25)


def test_model_prefill_uses_kernel_and_matches_sdpa(monkeypatch):
    """A whole Llama forward (no cache, no mask) through the kernel equals the SDPA forward."""
    from qru.model.config import LlamaConfig
    from qru.model.llama import Llama

    _ext()
    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny")).eval()
    ids = torch.randint(0, 512, (3, 37))
    calls = []
    ext = load_cpp_ext("attention")
    monkeypatch.setattr("qru.kernels.causal_attention.load_cpp_ext",
                        lambda name: _Spy(ext, calls) if name == "attention" else load_cpp_ext(name))
    with torch.no_grad():
        fast = model(ids)
    monkeypatch.setenv("QRU_BACKEND", "torch")
    with torch.no_grad():
        ref = model(ids)
    if ext.causal_attn_vectorized(model.config.head_dim):
        assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)


class _Spy:
    def __init__(self, ext, calls):
        self.ext, self.calls = ext, calls

    def causal_attn(self, *a):
        self.calls.append(a[0].shape)
        return self.ext.causal_attn(*a)

    def __getattr__(self, name):
        return getattr(self.ext, name)

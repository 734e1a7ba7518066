"""Fused Llama element-wise ops (qru.kernels.rmsnorm / rope / swiglu) against their plain-autograd
references and float64, on every backend (C++ AVX2 and scalar, Triton under the interpreter,
torch), fp32 and bf16, odd sizes (vector tails), strided inputs; and the Llama built on them
against the composite model."""
import pytest
import torch

from qru.kernels.rmsnorm import rms_norm, rms_norm_reference
from qru.kernels.rope import rope, rope_reference
from qru.kernels.swiglu import swiglu, swiglu_reference
from cpp_helpers import need_cpp

BACKENDS = ["torch", "triton", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cpp":
        need_cpp("llama_ops")
    monkeypatch.setenv("QRU_BACKEND", request.param)
    return request.param


def ext():
    e = need_cpp("llama_ops")
    return e


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def grads_of(fn, inputs, up):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(up)
    return out.detach(), [t.grad.clone() for t in inputs]


def leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_()


# ---------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 37), (70, 64), (1, 8)])
def test_rmsnorm_matches_reference(backend, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(shape, generator=g) * 3, dtype)
    w = leaf(1 + 0.3 * torch.randn(shape[-1], generator=g), dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    y, (dx, dw) = grads_of(lambda a, b: rms_norm(a, b, 1e-6), [x, w], up)
    ry, (rdx, rdw) = grads_of(lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w], up)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(y, ry, **tol(dtype))
    torch.testing.assert_close(dx.float(), rdx.float(), **tol(dtype))
    torch.testing.assert_close(dw.float(), rdw.float(), rtol=tol(dtype)["rtol"], atol=tol(dtype)["atol"] * 10)


def test_rmsnorm_fp64_oracle(backend):
    g = torch.Generator().manual_seed(1)
    x = leaf(torch.randn(9, 21, generator=g), torch.float32)
    w = leaf(torch.randn(21, generator=g), torch.float32)
    up = torch.randn(9, 21, generator=g)
    y, (dx, dw) = grads_of(lambda a, b: rms_norm(a, b, 1e-5), [x, w], up)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = w64 * x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5)
    y64.backward(up.double())
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_rmsnorm_mixed_dtypes_fall_back():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(8)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_cpp_scalar_equals_avx2(dtype):
    e = ext()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 45, generator=g).to(dtype)
    w = torch.randn(45, generator=g).to(dtype)
    dy = torch.randn(5, 45, generator=g).to(dtype)
    (y1, r1), (y2, r2) = e.rmsnorm_fwd(x, w, 1e-6, False), e.rmsnorm_fwd(x, w, 1e-6, True)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r1, r2, rtol=1e-6, atol=1e-6)
    (a1, b1), (a2, b2) = e.rmsnorm_bwd(dy, x, w, r1, False), e.rmsnorm_bwd(dy, x, w, r1, True)
    torch.testing.assert_close(a1.float(), a2.float(), **tol(dtype))
    torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- RoPE
def rope_inputs(B=2, T=5, NH=3, D=12, dtype=torch.float32, cos_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ang = torch.randn(B, T, D // 2, generator=g) * 3
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(cos_dtype or dtype), emb.sin().to(cos_dtype or dtype)
    flat = torch.randn(B, T, NH * D, generator=g).to(dtype)  # a projection output
    return flat, cos, sin


@pytest.mark.parametrize("dtype,cos_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.bfloat16, torch.float32)])
def test_rope_matches_reference(backend, dtype, cos_dtype):
    flat, cos, sin = rope_inputs(dtype=dtype, cos_dtype=cos_dtype)
    flat.requires_grad_()
    out_dtype = torch.promote_types(dtype, cos.dtype)
    up = torch.randn(2, 3, 5, 12).to(out_dtype)
    y, (dx,) = grads_of(lambda f: rope(f.view(2, 5, 3, 12), cos, sin), [flat], up)
    ry, (rdx,) = grads_of(lambda f: rope_reference(f.view(2, 5, 3, 12), cos, sin), [flat], up)
    assert y.shape == (2, 3, 5, 12) and y.dtype == out_dtype and dx.dtype == dtype
    # bf16 cos in the reference rounds every product to bf16; the fused op rounds once
    torch.testing.assert_close(y.float(), ry.float(), **tol(torch.float32 if cos_dtype else dtype))
    torch.testing.assert_close(dx.float(), rdx.float(), **tol(dtype))


def test_rope_fp64_oracle_and_strided_input(backend):
    """x as a strided slice (a fused qkv projection's k part); the rotation checked in fp64."""
    B, T, NH, D = 2, 4, 2, 8
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, 3 * NH * D, generator=g).requires_grad_()
    ang = torch.randn(B, T, D // 2, generator=g)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos(), emb.sin()
    x = qkv[..., NH * D:2 * NH * D].view(B, T, NH, D)
    up = torch.randn(B, NH, T, D, generator=g)
    y = rope(x, cos, sin)
    y.backward(up)
    x64 = x.detach().double().transpose(1, 2)
    c, s = cos.double()[:, None], sin.double()[:, None]
    h = D // 2
    want = torch.cat([x64[..., :h] * c[..., :h] - x64[..., h:] * s[..., :h],
                      x64[..., h:] * c[..., h:] + x64[..., :h] * s[..., h:]], -1)
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)
    # the gradient of a rotation is the inverse rotation (cos/sin of one angle per pair)
    u = up.double()
    gx = torch.cat([u[..., :h] * c[..., :h] + u[..., h:] * s[..., h:],
                    u[..., h:] * c[..., h:] - u[..., :h] * s[..., :h]], -1).transpose(1, 2)
    assert torch.all(qkv.grad[..., :NH * D] == 0) and torch.all(qkv.grad[..., 2 * NH * D:] == 0)
    torch.testing.assert_close(qkv.grad[..., NH * D:2 * NH * D].double(), gx.reshape(B, T, NH * D),
                               rtol=1e-5, atol=1e-6)


def test_rope_errors():
    x = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match="rope"):
        rope(x, torch.randn(2, 3, 6), torch.randn(2, 3, 6))


# ---------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 37), (2050,)])
def test_swiglu_matches_reference(backend, dtype, shape):
    gen = torch.Generator().manual_seed(4)
    g = leaf(torch.randn(shape, generator=gen) * 4, dtype)
    u = leaf(torch.randn(shape, generator=gen), dtype)
    up = torch.randn(shape, generator=gen).to(dtype)
    y, (dg, du) = grads_of(swiglu, [g, u], up)
    ry, (rdg, rdu) = grads_of(swiglu_reference, [g, u], up)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ry, **tol(dtype))
    torch.testing.assert_close(dg, rdg, **tol(dtype))
    torch.testing.assert_close(du, rdu, **tol(dtype))


def test_swiglu_fp64_oracle_extremes(backend):
    g = torch.tensor([-100.0, -20.0, -1.0, 0.0, 1e-4, 2.0, 20.0, 90.0, 3.3]).requires_grad_()
    u = torch.linspace(-2, 2, 9).requires_grad_()
    up = torch.ones(9)
    y, (dg, du) = grads_of(swiglu, [g, u], up)
    g64 = g.detach().double()
    s = torch.sigmoid(g64)
    torch.testing.assert_close(y.double(), g64 * s * u.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dg.double(), u.detach().double() * s * (1 + g64 * (1 - s)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du.double(), g64 * s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_cpp_scalar_equals_avx2(dtype):
    e = ext()
    gen = torch.Generator().manual_seed(5)
    g, u, d = (torch.randn(1003, generator=gen).to(dtype) * 3 for _ in range(3))
    torch.testing.assert_close(e.swiglu_fwd(g, u, False).float(), e.swiglu_fwd(g, u, True).float(), **tol(dtype))
    for a, b in zip(e.swiglu_bwd(d, g, u, False), e.swiglu_bwd(d, g, u, True)):
        torch.testing.assert_close(a.float(), b.float(), **tol(dtype))


# ---------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_fused_equals_composite(backend, dtype, monkeypatch):
    """The Llama forward/backward with the fused ops equals the same model with the reference ops."""
    import qru.model.llama as llama
    from qru.model.config import LlamaConfig

    torch.manual_seed(0)
    m = llama.Llama(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).to(dtype)
    ids = torch.randint(0, 61, (2, 9))
    out = m(ids)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    monkeypatch.setattr(llama, "rms_norm", rms_norm_reference)
    monkeypatch.setattr(llama, "rope", rope_reference)
    monkeypatch.setattr(llama, "swiglu", swiglu_reference)
    ref = m(ids)
    ref.float().square().mean().backward()
    t = tol(dtype) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.float(), ref.float(), **t)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n].float(), p.grad.float(), **t, msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_match_reference(dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(300, 4096, generator=gen).to(dtype).cuda().requires_grad_()
    w = torch.randn(4096, generator=gen).to(dtype).cuda().requires_grad_()
    up = torch.randn(300, 4096, generator=gen).to(dtype).cuda()
    y, (dx, dw) = grads_of(lambda a, b: rms_norm(a, b, 1e-6), [x, w], up)
    ry, (rdx, rdw) = grads_of(lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w], up)
    t = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y.float(), ry.float(), **t)
    torch.testing.assert_close(dx.float(), rdx.float(), **t)
    torch.testing.assert_close(dw.float(), rdw.float(), rtol=t["rtol"], atol=t["atol"] * 100)
    y2, (dg, du) = grads_of(swiglu, [x, x.detach().clone().requires_grad_()], up)
    flat, cos, sin = rope_inputs(B=2, T=64, NH=32, D=128, dtype=dtype)
    flat = flat.cuda().requires_grad_()
    up2 = torch.randn(2, 32, 64, 128).to(dtype).cuda()
    a, (da,) = grads_of(lambda f: rope(f.view(2, 64, 32, 128), cos.cuda(), sin.cuda()), [flat], up2)
    b, (db,) = grads_of(lambda f: rope_reference(f.view(2, 64, 32, 128), cos.cuda(), sin.cuda()), [flat], up2)
    torch.testing.assert_close(a.float(), b.float(), **t)
    torch.testing.assert_close(da.float(), db.float(), **t)

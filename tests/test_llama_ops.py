"""Fused Llama element-wise ops (qru.kernels.rmsnorm / rope / swiglu) against their plain-autograd
references and float64, on every backend (C++ AVX2 and scalar, Triton under the interpreter,
torch), fp32 and bf16, odd sizes (vector tails), strided inputs; and the Llama built on them
against the composite model."""
import pytest
import torch

from qru.kernels.rmsnorm import rms_norm, rms_norm_reference
from qru.kernels.rope import rope, rope_reference
from qru.kernels.swiglu import swiglu, swiglu_halves, swiglu_reference
from cpp_helpers import need_cpp, use_backend

BACKENDS = ["torch", "triton", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return use_backend(monkeypatch, request.param, "llama_ops")


@pytest.fixture(params=["triton", "cpp"])
def fused(request, monkeypatch):
    """The fused backends (``torch`` is the reference itself)."""
    return use_backend(monkeypatch, request.param, "llama_ops")


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


def bf16_ulps(a, b):
    """Element-wise distance of two bf16 tensors in units in the last place (bf16's sign-magnitude bit
    patterns mapped onto a monotone integer line, so -0 and +0 coincide and a sign change counts across 0)."""
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape

    def line(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)

    return (line(a) - line(b)).abs()


def test_bf16_ulps_oracle():
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    nxt = torch.tensor([1.0078125], dtype=torch.bfloat16)  # 1 + 2^-7: bf16's next value after 1
    assert bf16_ulps(one, nxt).item() == 1 and bf16_ulps(-one, -nxt).item() == 1
    assert bf16_ulps(torch.tensor([0.0]).bfloat16(), torch.tensor([-0.0]).bfloat16()).item() == 0
    tiny = torch.tensor([9.184e-41]).bfloat16()  # the smallest bf16 subnormal
    assert bf16_ulps(tiny, -tiny).item() == 2


ULP_SHAPES = [(1, 8), (3, 7, 37), (70, 64), (9, 4097)]


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


@pytest.mark.parametrize("shape", ULP_SHAPES, ids=str)
def test_rmsnorm_bf16_within_one_ulp(fused, shape):
    """bf16 RMSNorm on both fused backends: the output within 1 bf16 ulp of the bf16 reference, and dx within
    1 ulp of the reference's math done in fp32 on the same bf16 inputs (the fused backward rounds once;
    the bf16 reference rounds at every step). dw, a sum over rows, is checked by the tolerance tests."""
    g = torch.Generator().manual_seed(11)
    x = leaf(torch.randn(shape, generator=g) * 3, torch.bfloat16)
    w = leaf(1 + 0.3 * torch.randn(shape[-1], generator=g), torch.bfloat16)
    up = torch.randn(shape, generator=g).to(torch.bfloat16)
    y, (dx, _) = grads_of(lambda a, b: rms_norm(a, b, 1e-6), [x, w], up)
    ry = rms_norm_reference(x.detach(), w.detach(), 1e-6)
    x32, w32 = leaf(x.detach(), torch.float32), leaf(w.detach(), torch.float32)
    _, (rdx, _) = grads_of(lambda a, b: rms_norm_reference(a, b, 1e-6), [x32, w32], up.float())
    assert bf16_ulps(y, ry).max().item() <= 1
    assert bf16_ulps(dx, rdx.to(torch.bfloat16)).max().item() <= 1


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_distinct_cos_sin_halves(backend, dtype):
    """cos/sin whose two halves differ (HF's are two copies of one half): the fused op must pair x[i]
    with cos[i]/sin[i] and x[i+h] with cos[i+h]/sin[i+h] exactly as the reference, forward and
    backward, so a kernel that swaps or reuses a half fails here."""
    B, T, NH, D = 2, 5, 3, 12
    g = torch.Generator().manual_seed(13)
    cos = torch.randn(B, T, D, generator=g)
    sin = torch.randn(B, T, D, generator=g)
    assert not torch.equal(cos[..., :D // 2], cos[..., D // 2:])
    x = leaf(torch.randn(B, T, NH, D, generator=g), dtype)
    up = torch.randn(B, NH, T, D, generator=g).to(dtype)
    y, (dx,) = grads_of(lambda a: rope(a, cos, sin), [x], up)
    x64 = x.detach().double().transpose(1, 2)
    c, s_ = cos.double()[:, None], sin.double()[:, None]
    h = D // 2
    want = torch.cat([x64[..., :h] * c[..., :h] - x64[..., h:] * s_[..., :h],
                      x64[..., h:] * c[..., h:] + x64[..., :h] * s_[..., h:]], -1)
    u64 = up.double()
    # the transpose of the pair map [[c_i, -s_i], [s_{i+h}, c_{i+h}]]
    want_dx = torch.cat([u64[..., :h] * c[..., :h] + u64[..., h:] * s_[..., h:],
                         u64[..., h:] * c[..., h:] - u64[..., :h] * s_[..., :h]], -1).transpose(1, 2)
    t = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), want, **t)
    torch.testing.assert_close(dx.double(), want_dx, **t)
    ry, (rdx,) = grads_of(lambda a: rope_reference(a, cos.to(dtype), sin.to(dtype)), [x], up)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ry, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx, rdx, rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("shape", ULP_SHAPES + [(2050,)], ids=str)
def test_swiglu_bf16_within_one_ulp(fused, shape):
    """bf16 SwiGLU on both fused backends: output and both input gradients within 1 bf16 ulp of the bf16 reference."""
    gen = torch.Generator().manual_seed(12)
    g = leaf(torch.randn(shape, generator=gen) * 4, torch.bfloat16)
    u = leaf(torch.randn(shape, generator=gen), torch.bfloat16)
    up = torch.randn(shape, generator=gen).to(torch.bfloat16)
    y, grads = grads_of(swiglu, [g, u], up)
    ry, rgrads = grads_of(swiglu_reference, [g, u], up)
    for a, b in zip([y, *grads], [ry, *rgrads]):
        assert bf16_ulps(a, b).max().item() <= 1


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scalar", [False, True])
def test_swiglu_halves_equals_swiglu_of_the_halves(dtype, scalar):
    """The gate and up halves of one (row-strided) tensor, read in place: the kernel on the two
    halves (its vector/scalar split falls elsewhere: within an ulp), within tolerance of the
    reference; with grads: the reference's."""
    e = ext()
    gen = torch.Generator().manual_seed(6)
    full = (torch.randn(5, 3, 2 * 37 + 6, generator=gen) * 3).to(dtype)
    gu = full[..., 6:]  # a view: rows strided, unit last stride
    g, u = gu.chunk(2, -1)
    near = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    want = e.swiglu_fwd(g.contiguous(), u.contiguous(), scalar)
    torch.testing.assert_close(e.swiglu_halves_fwd(gu.reshape(15, 74), scalar).view(5, 3, 37), want, **near)
    with torch.no_grad():
        got = swiglu_halves(gu)
    assert got.shape == (5, 3, 37) and got.dtype == dtype
    torch.testing.assert_close(got, e.swiglu_fwd(g.contiguous(), u.contiguous(), False), **near)
    torch.testing.assert_close(got.float(), swiglu_reference(g, u).float(), **tol(dtype))
    leafed = gu.detach().clone().requires_grad_()
    y = swiglu_halves(leafed)
    y.float().sum().backward()
    ref = gu.detach().clone().requires_grad_()
    swiglu_reference(*ref.chunk(2, -1)).float().sum().backward()
    torch.testing.assert_close(leafed.grad.float(), ref.grad.float(), **tol(dtype))
    with pytest.raises(ValueError, match="even"):
        swiglu_halves(torch.zeros(2, 5))


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
    gt = x.detach().clone().requires_grad_()
    ut = (torch.randn(300, 4096, generator=gen).to(dtype).cuda()).requires_grad_()
    y2, (dg, du) = grads_of(swiglu, [gt, ut], up)
    ry2, (rdg, rdu) = grads_of(swiglu_reference, [gt, ut], up)
    for a, b in ((y2, ry2), (dg, rdg), (du, rdu)):
        torch.testing.assert_close(a.float(), b.float(), **t)
        if dtype == torch.bfloat16:
            assert bf16_ulps(a, b).max().item() <= 1
    flat, cos, sin = rope_inputs(B=2, T=64, NH=32, D=128, dtype=dtype)
    flat = flat.cuda().requires_grad_()
    up2 = torch.randn(2, 32, 64, 128).to(dtype).cuda()
    a, (da,) = grads_of(lambda f: rope(f.view(2, 64, 32, 128), cos.cuda(), sin.cuda()), [flat], up2)
    b, (db,) = grads_of(lambda f: rope_reference(f.view(2, 64, 32, 128), cos.cuda(), sin.cuda()), [flat], up2)
    torch.testing.assert_close(a.float(), b.float(), **t)
    torch.testing.assert_close(da.float(), db.float(), **t)

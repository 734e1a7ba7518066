"""Fused LoRA linear kernels vs the plain-autograd reference (fp32 oracle on the same inputs).

Triton runs under TRITON_INTERPRET=1 on CPU (conftest), so shapes stay small; they are
chosen awkward on purpose: odd token counts, in/out not multiples of 16, ranks that do not
fill (or exceed) the 16-wide rank tile.
"""
import pytest
import torch

from qru.kernels import hash_dropout as HD
from qru.kernels import lora as K
from qru.kernels._backend import backend_for

# max|got - ref| / max|ref| per dtype, for outputs and gradients.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

SHAPES = [  # (tokens, in, out, r)
    (7, 24, 20, 3),
    (33, 40, 56, 8),
    (5, 17, 19, 20),
]


def rel_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def make(M, n_in, n_out, r, dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, n_in, generator=g).to(dtype)
    W = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(dtype)
    A = (torch.randn(r, n_in, generator=g) / n_in ** 0.5)
    B = torch.randn(n_out, r, generator=g) / r ** 0.5
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    return x, W, b, A, B


def nf4_of(W: torch.Tensor, block_size: int = 64) -> K.NF4Weight:
    """Quantize with bitsandbytes (test-only peer) into qru's NF4 layout."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    q, st = bnbF.quantize_4bit(W.float().contiguous(), blocksize=block_size, quant_type="nf4")
    return K.NF4Weight(q.reshape(-1), st.absmax, tuple(W.shape), block_size,
                       bnbF.get_4bit_type("nf4", device="cpu"))


def run_and_grads(x, W, b, A, B, scale, **kw):
    x = x.clone().requires_grad_()
    A = A.clone().requires_grad_()
    B = B.clone().requires_grad_()
    y = K.lora_linear(x, W, b, A, B, scale, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), gy)
    return y, dx, dA, dB, gy


def reference(x, W, b, A, B, scale, gy, mask=None, keep=1.0, nf4=None):
    """fp32 oracle on the same (rounded) inputs."""
    x = x.float().clone().requires_grad_()
    A = A.float().clone().requires_grad_()
    B = B.float().clone().requires_grad_()
    Wf = nf4.dequantize(torch.float32) if nf4 is not None else W.float()
    y = K.lora_linear_reference(x, Wf, None if b is None else b.float(), A, B, scale,
                                dropout_mask=mask, keep_scale=keep)
    return (y,) + torch.autograd.grad(y, (x, A, B), gy.float())


@pytest.fixture(params=["triton", "cpp", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("QRU_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, shape, dtype):
    M, n_in, n_out, r = shape
    x, W, b, A, B = make(M, n_in, n_out, r, dtype, bias=(r == 8))
    y, dx, dA, dB, gy = run_and_grads(x, W, b, A, B, 0.75)
    ref = reference(x, W, b, A, B, 0.75, gy)
    assert y.dtype == dtype and dx.dtype == dtype and dA.dtype == torch.float32
    for name, got, want in zip(("y", "dX", "dA", "dB"), (y, dx, dA, dB), ref):
        assert rel_err(got, want) <= TOL[dtype], f"{backend} {name} {dtype} {shape}: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_dropout_mask(backend, shape, dtype):
    M, n_in, n_out, r = shape
    x, W, b, A, B = make(M, n_in, n_out, r, dtype)
    p = 0.3
    mask = torch.rand(M, n_in, generator=torch.Generator().manual_seed(5)) >= p
    y, dx, dA, dB, gy = run_and_grads(x, W, b, A, B, 1.5, dropout_p=p, dropout_mask=mask)
    ref = reference(x, W, b, A, B, 1.5, gy, mask=mask, keep=1 / (1 - p))
    for name, got, want in zip(("y", "dX", "dA", "dB"), (y, dx, dA, dB), ref):
        assert rel_err(got, want) <= TOL[dtype], f"{backend} {name}: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 25, 21, 3), (33, 40, 56, 8)], ids=lambda s: "x".join(map(str, s)))
def test_nf4_base(backend, shape, dtype):
    M, n_in, n_out, r = shape
    x, W, b, A, B = make(M, n_in, n_out, r, dtype)
    nf4 = nf4_of(W)
    mask = torch.rand(M, n_in, generator=torch.Generator().manual_seed(2)) >= 0.2 if r == 8 else None
    p = 0.2 if mask is not None else 0.0
    y, dx, dA, dB, gy = run_and_grads(x, None, b, A, B, 0.5, nf4=nf4, dropout_p=p, dropout_mask=mask)
    ref = reference(x, None, b, A, B, 0.5, gy, mask=mask, keep=1 / (1 - p), nf4=nf4)
    for name, got, want in zip(("y", "dX", "dA", "dB"), (y, dx, dA, dB), ref):
        assert rel_err(got, want) <= TOL[dtype], f"{backend} nf4 {name}: {rel_err(got, want):.2e}"


def test_nf4_decode_matches_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(13, 27)  # 351 elements: odd count, partial last block
    q, st = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
    nf4 = K.NF4Weight(q.reshape(-1), st.absmax, (13, 27), 64, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dequantize(), bnbF.dequantize_4bit(q, st))
    # without an explicit codebook: qru.kernels.quant4.NF4_CODE, which must be bitsandbytes'
    default = K.NF4Weight(q.reshape(-1), st.absmax, (13, 27), 64)
    assert torch.equal(default.code, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(default.dequantize(), bnbF.dequantize_4bit(q, st))


@pytest.mark.parametrize("bias", [False, True])
def test_base_only_and_3d_input(backend, bias):
    x, W, b, _, _ = make(10, 24, 20, 3, torch.float32, bias=bias)
    x3 = x.reshape(2, 5, 24).clone().requires_grad_()
    y = K.lora_linear(x3, W, b, None, None, 0.0)
    assert y.shape == (2, 5, 20)
    (dx,) = torch.autograd.grad(y, x3, torch.ones_like(y))
    ref = torch.nn.functional.linear(x3, W, b)
    assert rel_err(y, ref) <= TOL[torch.float32]
    assert rel_err(dx, torch.ones(2, 5, 20) @ W) <= TOL[torch.float32]


def test_3d_input_with_lora(backend):
    x, W, b, A, B = make(12, 24, 20, 8, torch.float32, bias=True)
    y2, dx2, dA2, dB2, gy = run_and_grads(x, W, b, A, B, 2.0)
    x3 = x.reshape(3, 4, 24).clone().requires_grad_()
    A3, B3 = A.clone().requires_grad_(), B.clone().requires_grad_()
    y3 = K.lora_linear(x3, W, b, A3, B3, 2.0)
    dx3, dA3, dB3 = torch.autograd.grad(y3, (x3, A3, B3), gy.reshape(3, 4, 20))
    assert torch.allclose(y3.reshape(12, 20), y2, atol=1e-6)
    assert torch.allclose(dx3.reshape(12, 24), dx2, atol=1e-6)
    assert torch.allclose(dA3, dA2, atol=1e-5) and torch.allclose(dB3, dB2, atol=1e-5)


def test_no_tokens(backend):
    x, W, b, A, B = make(0, 24, 20, 3, torch.float32, bias=True)
    y, dx, dA, dB, _ = run_and_grads(x, W, b, A, B, 1.0)
    assert y.shape == (0, 20) and dx.shape == (0, 24)
    assert torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0


def test_bias_gradient(backend):
    x, W, b, A, B = make(9, 24, 20, 3, torch.float32, bias=True)
    b = b.clone().requires_grad_()
    y = K.lora_linear(x, W, b, A, B, 1.0)
    (db,) = torch.autograd.grad(y, b, torch.ones_like(y))
    assert torch.allclose(db, torch.full((20,), 9.0))


def test_no_input_grad_skips_dx(backend):
    x, W, b, A, B = make(9, 24, 20, 3, torch.float32)
    A = A.requires_grad_()
    y = K.lora_linear(x, W, b, A, B, 1.0)
    (dA,) = torch.autograd.grad(y.sum(), A)
    ref = reference(x, W, b, A.detach(), B, 1.0, torch.ones_like(y))
    assert rel_err(dA, ref[2]) <= TOL[torch.float32]


def test_dropout_training_uses_generator_mask(backend):
    x, W, b, A, B = make(16, 24, 20, 4, torch.float32)
    p = 0.25
    mask, keep = K.make_dropout_mask((16, 24), p, "cpu", torch.Generator().manual_seed(7))
    y = K.lora_linear(x, W, b, A, B, 1.0, dropout_p=p, training=True,
                      generator=torch.Generator().manual_seed(7))
    ref = K.lora_linear_reference(x, W, b, A, B, 1.0, dropout_mask=mask, keep_scale=keep)
    assert rel_err(y, ref) <= TOL[torch.float32]
    # eval: no dropout
    y_eval = K.lora_linear(x, W, b, A, B, 1.0, dropout_p=p, training=False)
    assert rel_err(y_eval, K.lora_linear_reference(x, W, b, A, B, 1.0)) <= TOL[torch.float32]


def test_dropout_mask_rate_and_scale():
    n = 400_000
    for p in (0.05, 0.1, 0.5):
        mask, keep = K.make_dropout_mask((n,), p, "cpu", torch.Generator().manual_seed(0))
        rate = 1 - mask.float().mean().item()
        assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1 / 65536
        assert keep == pytest.approx(1 / (1 - p), rel=1e-4)
    mask, keep = K.make_dropout_mask((3, 5), 0.0, "cpu")
    assert mask.all() and keep == 1.0
    with pytest.raises(ValueError, match="dropout"):
        K.make_dropout_mask((3,), 1.0, "cpu")


def test_backend_dispatch(monkeypatch):
    monkeypatch.delenv("QRU_BACKEND", raising=False)
    assert backend_for(torch.zeros(1), cpp=None) == "torch"
    monkeypatch.setenv("QRU_BACKEND", "triton")
    assert backend_for(torch.zeros(1), cpp=None) == "triton"  # TRITON_INTERPRET=1 under tests


def test_bad_inputs_name_the_culprit():
    x, W, b, A, B = make(4, 24, 20, 3, torch.float32)
    with pytest.raises(ValueError, match="lora_A"):
        K.lora_linear(x, W, b, A[:, :10], B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        K.lora_linear(x, W, b, A, B[:5], 1.0)
    with pytest.raises(ValueError, match="features"):
        K.lora_linear(x[:, :10], W, b, A, B, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        K.lora_linear(x, W.clone().requires_grad_(), b, A, B, 1.0)
    with pytest.raises(TypeError, match="weight"):
        K.lora_linear(x, W.double(), b, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_mask"):
        K.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.1, dropout_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="absmax"):
        K.NF4Weight(torch.zeros(240, dtype=torch.uint8), torch.ones(3), (20, 24), 64, torch.zeros(16))


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bf16_autocast_matches_autocast_reference(backend, base, dropout):
    """fp32 x / W / bias / A / B under CPU bf16 autocast: the op casts them as autocast casts
    F.linear, so output and gradients match the plain F.linear composition under the same
    autocast; the gradients reach the fp32 leaves in fp32."""
    M, n_in, n_out, r = 33, 40, 56, 8
    x, W, b, A, B = make(M, n_in, n_out, r, torch.float32, bias=True)
    nf4 = nf4_of(W) if base == "nf4" else None
    Wb = None if nf4 is not None else W
    mask = torch.rand(M, n_in, generator=torch.Generator().manual_seed(3)) >= dropout if dropout else None
    gy = torch.randn(M, n_out, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_() for t in (x, b, A, B)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = K.lora_linear(leaves[0], Wb, leaves[1], leaves[2], leaves[3], 0.75, dropout_p=dropout,
                          dropout_mask=mask, nf4=nf4)
    got = (y,) + torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.clone().requires_grad_() for t in (x, b, A, B)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr = K.lora_linear_reference(ref_leaves[0], W if nf4 is None else None, ref_leaves[1], ref_leaves[2],
                                     ref_leaves[3], 0.75, dropout_mask=mask, keep_scale=1 / (1 - dropout), nf4=nf4)
    want = (yr,) + torch.autograd.grad(yr, ref_leaves, gy)
    assert y.dtype == torch.bfloat16 and yr.dtype == torch.bfloat16
    for name, g, w in zip(("y", "dX", "db", "dA", "dB"), got, want):
        if name != "y":
            assert g.dtype == torch.float32, f"{name} should come back in its leaf's fp32"
        assert rel_err(g, w) <= TOL[torch.bfloat16], f"{backend} {base} p{dropout} {name}: {rel_err(g, w):.2e}"
    # and the autocast result really is bf16 math: off the fp32 result by more than fp32 noise
    y32 = K.lora_linear_reference(x, W if nf4 is None else nf4.dequantize(), b, A, B, 0.75, dropout_mask=mask,
                                  keep_scale=1 / (1 - dropout))
    assert 1e-4 < rel_err(y, y32) <= TOL[torch.bfloat16]


def test_autocast_disabled_inside_and_base_only(backend):
    """Base-only (no adapters) under autocast, and an already-bf16 input with fp32 weights."""
    x, W, b, _, _ = make(10, 24, 20, 3, torch.float32, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = K.lora_linear(x.bfloat16(), W, b, None, None, 0.0)
        ref = torch.nn.functional.linear(x.bfloat16(), W, b)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert rel_err(y, ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("shape", [(1, 8, 1, 8), (7, 24, 3, 20), (33, 40, 8, 56), (5, 17, 20, 19),
                                   (100, 1030, 16, 777), (600, 64, 13, 33), (100, 2100, 64, 1100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpp_thin_products_match_torch(shape, scalar):
    """csrc/lora.cpp's three products (SIMD micro-tiles and the portable scalar path) against
    torch on odd shapes: row/column/rank tails, a bool drop-mask, row-strided X, bias; the
    last shape spans several K chunks (rowdot), column panels (expand) and row groups."""
    from qru.kernels._backend import load_cpp_ext

    ext = load_cpp_ext("lora")
    if ext is None:
        pytest.skip("no C++ toolchain")
    M, Kd, R, N = shape
    g = torch.Generator().manual_seed(M + Kd)
    X = torch.randn(M, Kd + 5, generator=g)[:, 2:Kd + 2]  # row stride != Kd
    V = torch.randn(R, Kd, generator=g)
    dK = torch.rand(M, Kd, generator=g) < 0.3
    U = torch.randn(M, R, generator=g)
    V2 = torch.randn(R, N, generator=g)
    b = torch.randn(N, generator=g)
    dN = torch.rand(M, N, generator=g) < 0.3
    X2 = torch.randn(M, N, generator=g)
    d = torch.float64
    X64, V64, U64, V264, X264 = (t.to(d) for t in (X, V, U, V2, X2))
    # (got, fp64 oracle, the fp64 sum of |terms|: the scale of the fp32 rounding error)
    cases = [
        (ext.rowdot(X, V, 0.7, None, scalar=scalar), 0.7 * X64 @ V64.t(), 0.7 * X64.abs() @ V64.abs().t()),
        (ext.rowdot(X, V, 0.7, dK, scalar=scalar), 0.7 * X64.masked_fill(dK, 0) @ V64.t(), 0.7 * X64.abs() @ V64.abs().t()),
        (ext.expand(U, V2, 0.7, scalar=scalar), 0.7 * U64 @ V264, 0.7 * U64.abs() @ V264.abs()),
        (ext.expand(U, V2, 0.7, b, dN, scalar=scalar), (b.to(d) + 0.7 * U64 @ V264).masked_fill(dN, 0),
         b.to(d).abs() + 0.7 * U64.abs() @ V264.abs()),
        (ext.tallreduce(U, X2, 0.7, scalar=scalar), 0.7 * U64.t() @ X264, 0.7 * U64.abs().t() @ X264.abs()),
        (ext.tallreduce(U, X2, 0.7, dN, scalar=scalar), 0.7 * U64.t() @ X264.masked_fill(dN, 0),
         0.7 * U64.abs().t() @ X264.abs()),
    ]
    for i, (got, want, mag) in enumerate(cases):
        assert got.shape == want.shape and got.dtype == torch.float32
        err = ((got.to(d) - want).abs() / mag.clamp_min(1e-30)).max().item()
        assert err <= 4e-7 * max(Kd, R, M) ** 0.5 + 2e-7, f"case {i}: {err:.2e}"
    with pytest.raises(RuntimeError, match="V has"):
        ext.rowdot(X, V[:, :-1], 1.0)


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
def test_hash_dropout_cpp_matches_reference(scalar):
    """The counter-based mask: C++ (SIMD and scalar) bit-equal to the torch-ops oracle, for
    seeds with high bits set and odd shapes; the kernels fed (seed, thr) give exactly what they
    give for the materialized bool mask."""
    from qru.kernels._backend import load_cpp_ext

    ext = load_cpp_ext("lora")
    if ext is None:
        pytest.skip("no C++ toolchain")
    for rows, cols, seed, thr in [(1, 1, 0, 1), (7, 25, -1, 3277), (33, 40, 2 ** 62 + 12345, 32768),
                                  (300, 129, -(2 ** 63), 65535)]:
        ref = HD.hash_drop_reference(rows, cols, torch.tensor(seed), thr)
        assert torch.equal(ext.drop_mask(rows, cols, seed, thr, scalar=scalar), ref), (rows, cols, seed, thr)
    M, Kd, R, N = 37, 45, 5, 29
    g = torch.Generator().manual_seed(0)
    X, V = torch.randn(M, Kd, generator=g), torch.randn(R, Kd, generator=g)
    U, V2, X2 = torch.randn(M, R, generator=g), torch.randn(R, N, generator=g), torch.randn(M, N, generator=g)
    seed, thr = 987654321987, 19661
    dK = HD.hash_drop_reference(M, Kd, torch.tensor(seed), thr)
    dN = HD.hash_drop_reference(M, N, torch.tensor(seed), thr)
    assert 0 < dK.sum() < dK.numel()
    assert torch.equal(ext.rowdot(X, V, 0.5, None, seed, thr, scalar=scalar), ext.rowdot(X, V, 0.5, dK, scalar=scalar))
    assert torch.equal(ext.expand(U, V2, 0.5, None, None, seed, thr, scalar=scalar),
                       ext.expand(U, V2, 0.5, None, dN, scalar=scalar))
    assert torch.equal(ext.tallreduce(U, X2, 0.5, None, seed, thr, scalar=scalar),
                       ext.tallreduce(U, X2, 0.5, dN, scalar=scalar))


def test_hash_dropout_statistics():
    """Rows, columns and neighbours of the 2-D mask behave like independent Bernoulli(p) draws:
    per-row and per-column drop rates, and agreement between adjacent rows and columns."""
    rows, cols, p = 512, 1024, 0.1
    gen = torch.Generator().manual_seed(3)
    keep_mask, _ = K.make_dropout_mask((rows, cols), p, "cpu", gen)
    d = (~keep_mask).float()
    sd = (p * (1 - p)) ** 0.5
    assert abs(d.mean().item() - p) < 5 * sd / (rows * cols) ** 0.5
    assert (d.mean(1) - p).abs().max().item() < 5 * sd / cols ** 0.5
    assert (d.mean(0) - p).abs().max().item() < 5 * sd / rows ** 0.5
    for a, b in ((d[1:], d[:-1]), (d[:, 1:], d[:, :-1])):  # P(both dropped) = p²
        both = (a * b).mean().item()
        assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / a.numel()) ** 0.5
    # a new draw from the same generator is a different mask; the same state the same mask
    again, _ = K.make_dropout_mask((rows, cols), p, "cpu", gen)
    assert not torch.equal(again, keep_mask)
    same, _ = K.make_dropout_mask((rows, cols), p, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(same, keep_mask)


def test_cpp_dropout_keeps_no_mask_or_copy(monkeypatch):
    """With sampled dropout the C++ path saves x itself and the thin u: no bool mask, no
    dropped-out copy of x (the mask is recomputed from the seed in backward)."""
    from qru.kernels._backend import load_cpp_ext

    if load_cpp_ext("lora") is None:
        pytest.skip("no C++ toolchain")
    monkeypatch.setenv("QRU_BACKEND", "cpp")
    x, W, b, A, B = make(64, 48, 40, 4, torch.float32)
    x.requires_grad_()
    A.requires_grad_()
    y = K.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.2, training=True, generator=torch.Generator().manual_seed(1))
    node = y.grad_fn
    while type(node).__name__ != "LoRALinearCppFnBackward":
        node = node.next_functions[0][0]
    saved = [t for t in node.saved_tensors if t is not None]
    assert not any(t.dtype == torch.bool for t in saved)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.data_ptr() == x.data_ptr() for t in big)

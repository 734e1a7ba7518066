"""Fused fake quantization (qru.kernels.fake_quant): bit-equal to qru.quant's quantize then dequantize
for every format, backend and dtype; the straight-through gradient is the identity and equals the
gradient of the unrounded path (finite differences); LoRA mode against the materialised merge."""
import pytest
import torch

from qru.kernels import fake_quant as fq
from qru.kernels._backend import load_cpp_ext
from qru.quant import dequantize, quantize
from cpp_helpers import need_cpp

# the interpreter evaluates masked-out lanes too (0/0 for all-zero groups): numpy warns
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["torch", "cpp", "triton"]
# (shape, block_size): partial last blocks / groups, odd counts, exact fits, 1-D and 3-D
SHAPES = {
    "nf4": [((3, 50), 32), ((1, 7), None), ((4, 64), 64), ((130,), 64)],
    "int4": [((3, 50), 32), ((2, 256), None), ((1, 2), 32)],
    "int8": [((3, 50), None), ((1, 1), None), ((2, 3, 5), None)],
    "q8_0": [((3, 50), None), ((2, 64), None), ((1, 5), None)],
    "q4_k": [((2, 300), None)],
}
FAMILY = {"nf4": "nf4", "fp4": "nf4", "int4": "int4", "int4_sym": "int4", "int8": "int8", "q4_k": "q4_k",
          **{f: "q8_0" for f in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4")}}


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def weight(shape, dtype, seed=0):
    """Gaussian weights with an all-zero first block, a constant run and repeated maxima."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    flat = w.view(-1)
    if flat.numel() >= 80:
        flat[:32] = 0.0
        flat[32:40] = 0.02
        flat[40] = 0.3
        flat[41] = -0.3
    return w.to(dtype)


def oracle(w, fmt, bs, monkeypatch):
    monkeypatch.setenv("QRU_BACKEND", "torch")
    return dequantize(quantize(w, fmt, bs))


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cpp":
        need_cpp("fake_quant")
    return request.param


def cases(backend):
    for fmt, fam in FAMILY.items():
        if fmt == "q4_k" and backend == "triton":
            continue  # q4_k runs quant_gguf's kernels (tested there); an interpreter run takes seconds
        shapes = SHAPES[fam] if backend != "triton" else SHAPES[fam][:1]  # the interpreter is slow
        for shape, bs in shapes:
            yield fmt, shape, bs


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_equal_to_quantize_dequantize(backend, dtype, monkeypatch):
    for fmt, shape, bs in cases(backend):
        w = weight(shape, dtype)
        ref = oracle(w, fmt, bs, monkeypatch)
        monkeypatch.setenv("QRU_BACKEND", backend)
        got = fq.fake_quant_values(w, fmt, bs)
        assert got.shape == w.shape and got.dtype == dtype, (fmt, shape)
        assert torch.equal(bits(got), bits(ref)), (fmt, shape, bs, (got.float() - ref.float()).abs().max())
        # the differentiable entry point gives the same values
        assert torch.equal(bits(fq.fake_quant(w, fmt, bs)), bits(ref)), (fmt, shape)


def test_reference_is_quantize_dequantize_for_every_format(monkeypatch):
    for fmt in fq.FAKE_QUANT_FORMATS:
        w = weight((4, 96), torch.float32, seed=3)
        assert torch.equal(bits(fq.fake_quant_reference(w, fmt)), bits(oracle(w, fmt, None, monkeypatch))), fmt


@pytest.mark.parametrize("wdtype,adtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16)])
def test_lora_bit_equal_to_materialised_merge(backend, wdtype, adtype, monkeypatch):
    g = torch.Generator().manual_seed(1)
    for fmt, fam in FAMILY.items():
        if fmt == "q4_k" and backend == "triton":
            continue
        shape = (6, 100) if fam != "q4_k" else (3, 200)
        if fam == "nf4" and backend != "triton":
            shape = (5, 77)  # flat blocks that straddle rows
        bs = 32 if fam in ("nf4", "int4") else None
        w = weight(shape, wdtype, seed=2)
        a = (torch.randn(3, shape[1], generator=g) * 0.1).to(adtype)
        b = (torch.randn(shape[0], 3, generator=g) * 0.1).to(adtype)
        monkeypatch.setenv("QRU_BACKEND", "torch")
        merged = fq.merge_reference(w, a, b, 0.7)
        ref = dequantize(quantize(merged, fmt, bs), wdtype)  # materialised merge, then qru.quant
        monkeypatch.setenv("QRU_BACKEND", backend)
        got = fq.fake_quant_values(w, fmt, bs, lora=(a, b, 0.7))
        assert got.dtype == wdtype and torch.equal(bits(got), bits(ref)), (fmt, backend)
        assert torch.equal(bits(fq.fake_quant_lora(w, a, b, 0.7, fmt, bs)), bits(ref)), fmt


def test_merge_reference_is_the_merge():
    g = torch.Generator().manual_seed(4)
    w, a, b = torch.randn(5, 9, generator=g), torch.randn(4, 9, generator=g), torch.randn(5, 4, generator=g)
    assert torch.allclose(fq.merge_reference(w, a, b, 0.5), w + 0.5 * b @ a, rtol=1e-6, atol=1e-6)


def test_lora_with_zero_b_is_plain_fake_quant(backend, monkeypatch):
    monkeypatch.setenv("QRU_BACKEND", backend)
    w = weight((4, 64), torch.float32, seed=5)
    a = torch.randn(2, 64)
    for fmt in ("nf4", "int4", "q4_0", "mxfp4"):
        bs = 32 if fmt in ("nf4", "int4") else None
        assert torch.equal(fq.fake_quant_values(w, fmt, bs, lora=(a, torch.zeros(4, 2), 2.0)),
                           fq.fake_quant_values(w, fmt, bs)), fmt


# ----------------------------------------------------------------------------- straight-through gradient


def smooth_loss(x, c, v):
    """A smooth loss of the weight: a quadratic through a fixed projection plus a sine term."""
    return (x @ v).pow(2).sum() + (torch.sin(3 * x) * c).sum()


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8", "q4_1", "mxfp4"])
def test_ste_gradient_matches_finite_differences_of_unrounded_path(fmt, monkeypatch):
    monkeypatch.setenv("QRU_BACKEND", "torch")
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 64, generator=g) * 0.1
    c, v = torch.randn(4, 64, generator=g), torch.randn(64, 3, generator=g)
    wp = w.clone().requires_grad_(True)
    smooth_loss(fq.fake_quant(wp, fmt, 32 if fmt in ("nf4", "int4") else None), c, v).backward()
    # the unrounded path h(W) = L(W + R), R = W_q - W frozen at the current point, in float64
    r = (fq.fake_quant_values(w, fmt, 32 if fmt in ("nf4", "int4") else None) - w).double()
    w64, c64, v64 = w.double(), c.double(), v.double()
    eps = 1e-6
    for idx in [(0, 0), (1, 17), (2, 40), (3, 63)]:
        e = torch.zeros_like(w64)
        e[idx] = eps
        fd = (smooth_loss(w64 + e + r, c64, v64) - smooth_loss(w64 - e + r, c64, v64)) / (2 * eps)
        assert abs(wp.grad[idx].item() - fd.item()) <= 1e-4 * max(1.0, abs(fd.item())), (fmt, idx)
    assert (r != 0).any()  # the rounding did move the weights: the check is not the trivial one


@pytest.mark.parametrize("dtype", DTYPES)
def test_ste_backward_is_exactly_identity(dtype):
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(3, 64, generator=g) * 0.1).to(dtype).requires_grad_(True)
    grad = torch.randn(3, 64, generator=g).to(dtype)
    for fmt in ("nf4", "int4_sym", "q8_0"):
        (gw,) = torch.autograd.grad(fq.fake_quant(w, fmt, 32 if fmt in ("nf4", "int4_sym") else None), w, grad)
        assert gw.dtype == dtype and torch.equal(bits(gw), bits(grad)), fmt


def test_ste_jacobian_is_the_identity():
    w = torch.randn(2, 32) * 0.1
    jac = torch.autograd.functional.jacobian(lambda x: fq.fake_quant(x, "fp4", 32), w)
    assert torch.equal(jac.reshape(64, 64), torch.eye(64))


@pytest.mark.parametrize("fmt", ["nf4", "int4", "q5_0", "q4_k"])
def test_lora_ste_gradients(fmt, monkeypatch):
    monkeypatch.setenv("QRU_BACKEND", "cpp" if load_cpp_ext("fake_quant") is not None else "torch")
    g = torch.Generator().manual_seed(8)
    shape = (4, 64) if fmt != "q4_k" else (2, 256)
    bs = 32 if fmt in ("nf4", "int4") else None
    w = torch.randn(shape, generator=g) * 0.1
    a = (torch.randn(3, shape[1], generator=g) * 0.1).requires_grad_(True)
    b = (torch.randn(shape[0], 3, generator=g) * 0.1).requires_grad_(True)
    c, v = torch.randn(shape, generator=g), torch.randn(shape[1], 2, generator=g)
    s = 0.8
    smooth_loss(fq.fake_quant_lora(w, a, b, s, fmt, bs), c, v).backward()
    # oracle 1: autograd of the unrounded merge, W + s B A + R with R frozen, in float64
    with torch.no_grad():
        r = fq.fake_quant_values(w, fmt, bs, lora=(a, b, s)).double() - fq.merge_reference(w, a, b, s).double()
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    smooth_loss(w.double() + s * b64 @ a64 + r, c.double(), v.double()).backward()
    assert torch.allclose(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)
    # oracle 2: finite differences on a few entries of A and B
    eps = 1e-6

    def h(A, B):
        return smooth_loss(w.double() + s * B @ A + r, c.double(), v.double()).item()

    A0, B0 = a.detach().double(), b.detach().double()
    for k, j in [(0, 0), (2, shape[1] - 1)]:
        e = torch.zeros_like(A0)
        e[k, j] = eps
        fd, ste = (h(A0 + e, B0) - h(A0 - e, B0)) / (2 * eps), a.grad[k, j].item()
        assert abs(fd - ste) < 1e-4 * max(1, abs(ste)), (k, j, fd, ste)
    for i, k in [(0, 1), (shape[0] - 1, 2)]:
        e = torch.zeros_like(B0)
        e[i, k] = eps
        fd, ste = (h(A0, B0 + e) - h(A0, B0 - e)) / (2 * eps), b.grad[i, k].item()
        assert abs(fd - ste) < 1e-4 * max(1, abs(ste)), (i, k, fd, ste)


def test_lora_backward_formula_exact():
    """dA = s·(Bᵀ G), dB = s·(G Aᵀ) in fp32, cast to the factors' dtype; dW = G when W trains."""
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(4, 64, generator=g) * 0.1).requires_grad_(True)
    a = torch.randn(2, 64, generator=g, dtype=torch.float32).requires_grad_(True)
    b = torch.randn(4, 2, generator=g).to(torch.bfloat16).requires_grad_(True)
    G = torch.randn(4, 64, generator=g)
    gw, ga, gb = torch.autograd.grad(fq.fake_quant_lora(w, a, b, 0.5, "nf4", 64), (w, a, b), G)
    assert torch.equal(gw, G)
    assert torch.equal(ga, 0.5 * (b.detach().float().t() @ G))
    assert torch.equal(gb, (0.5 * (G @ a.detach().t())).to(torch.bfloat16))


# ----------------------------------------------------------------------------- errors


def test_bad_input_names_the_culprit(backend, monkeypatch):
    monkeypatch.setenv("QRU_BACKEND", backend)
    w = torch.randn(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layers.0.q_proj.weight contains NaN or Inf \(first at index \(1, 3\)\)"):
        fq.fake_quant(w, "nf4", name="layers.0.q_proj.weight")
    with pytest.raises(ValueError, match="overflows q8_0's scale"):
        fq.fake_quant(torch.full((1, 32), 1e8), "q8_0")
    with pytest.raises(ValueError, match="fmt must be one of"):
        fq.fake_quant(torch.randn(2, 64), "int3")
    with pytest.raises(ValueError, match="q4_0 has a fixed block of 32"):
        fq.fake_quant(torch.randn(2, 64), "q4_0", 64)
    with pytest.raises(ValueError, match="last dimension, which must be even"):
        fq.fake_quant(torch.randn(2, 63), "int4")
    with pytest.raises(ValueError, match="int8 is per output channel"):
        fq.fake_quant(torch.randn(2, 64), "int8", 64)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        fq.fake_quant(torch.randn(2, 64).double(), "nf4")
    with pytest.raises(ValueError, match=r"q_proj: LoRA shapes must be W \[out, in\], A \[r, in\], B \[out, r\]"):
        fq.fake_quant_lora(torch.randn(4, 64), torch.randn(2, 32), torch.randn(4, 2), 1.0, "nf4", name="q_proj")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fq.fake_quant_lora(torch.randn(4, 64), torch.randn(2, 64), torch.randn(4, 2), float("inf"), "nf4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_equal_on_adversarial_values(backend, dtype, monkeypatch):
    """Blocks spanning 40 orders of magnitude, subnormals, exact codebook midpoints and negative maxima."""
    g = torch.Generator().manual_seed(11)
    mag = 10.0 ** (torch.rand(8, 1, generator=g) * 40 - 36)  # one scale per 64-element row
    w = torch.randn(8, 64, generator=g) * mag
    w[0, :5] = torch.tensor([1e-40, -1e-41, 0.0, -0.0, 1e-45])
    w[1, :16] = torch.tensor(fq.quant4.NF4_BOUNDS + [1.0]) * 3.0  # nf4 midpoints of an absmax-3 block
    w[1, 16:] = torch.randn(48, generator=g) * 0.1
    w[2, 0] = -5.0  # the largest |x| is negative (q4_0's signed scale)
    w = w.to(dtype)
    for fmt in fq.FUSED_FORMATS:
        bs = 32 if fmt in ("nf4", "fp4", "int4", "int4_sym") else None
        if fmt in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):
            w_fmt = w.clamp(-6e4, 6e4)  # fp16 block scales
        else:
            w_fmt = w
        ref = oracle(w_fmt, fmt, bs, monkeypatch)
        monkeypatch.setenv("QRU_BACKEND", backend)
        assert torch.equal(bits(fq.fake_quant_values(w_fmt, fmt, bs)), bits(ref)), fmt


def test_q4_k_through_triton(monkeypatch):
    """q4_k is not fused: under QRU_BACKEND=triton it runs quant_gguf's Triton kernels (one super-block
    plus a partial one, since the interpreter takes seconds per launch)."""
    w = weight((1, 300), torch.float32, seed=12)
    ref = oracle(w, "q4_k", None, monkeypatch)
    monkeypatch.setenv("QRU_BACKEND", "triton")
    assert torch.equal(bits(fq.fake_quant_values(w, "q4_k")), bits(ref))

"""llama.cpp (GGUF) block formats: every backend against gguf.quants (llama.cpp's reference numpy
quantizers) and, for q4_k, a line-by-line transcription of ggml-quants.c."""
import numpy as np
import pytest
import torch

import qru.quant as Q
from qru.kernels import quant_gguf as G

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from q4k_transcription import quantize_q4_k  # noqa: E402

TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1,
         "q4_k": T.Q4_K, "mxfp4": T.MXFP4}
GGUF_QUANTIZES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def awkward(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with zero, constant, huge, tiny and one-outlier blocks mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.05
    flat = x.view(-1)
    n = flat.numel()
    if n >= 256:
        flat[0:32] = 0.0                       # an all-zero block
        flat[32:64] = 0.75                     # a constant positive block
        flat[64:96] = -0.5                     # a constant negative block
        flat[96:128] *= 1e5                    # huge (still within the fp16 scales)
        flat[128:160] *= 1e-5                  # tiny (fp16 scales go subnormal)
        flat[160] = 3.0                        # one outlier
        flat[192:224] = flat[192:224].abs() + 1.0  # all positive, min > 0
    if n >= 512:
        flat[256:512] = 0.0                    # an all-zero super-block
    return x


def backends(fmt: str):
    return {"torch": lambda x: G.quantize_gguf_reference(x, fmt), "cpp": lambda x: G._quantize_cpp(x, fmt),
            "triton": lambda x: G._quantize_triton(x, fmt)}


def gguf_bytes(x: torch.Tensor, fmt: str) -> np.ndarray:
    return gguf.quants.quantize(x.float().numpy(), TYPES[fmt]).reshape(-1)


@pytest.mark.parametrize("fmt", GGUF_QUANTIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32), (37, 64), (3, 512)])
def test_quantize_bytes_equal_gguf(fmt, dtype, shape):
    x = awkward(*shape).to(dtype)
    ref = gguf_bytes(x, fmt)
    for name, fn in backends(fmt).items():
        got = fn(x)
        assert got.dtype == torch.uint8 and got.numel() == ref.size
        assert np.array_equal(got.numpy(), ref), f"{name} {fmt} {dtype} {shape}"


@pytest.mark.parametrize("fmt", G.GGUF_FORMATS)
@pytest.mark.parametrize("out", DTYPES)
def test_dequantize_bit_exact_with_gguf(fmt, out):
    x = awkward(5, 512, seed=1)
    data = G.quantize_gguf_reference(x, fmt)
    ref = torch.from_numpy(gguf.quants.dequantize(data.numpy().reshape(5, -1), TYPES[fmt]).reshape(-1).copy())
    ref = ref.to(out)
    n = x.numel()
    for name, got in (("torch", G.dequantize_gguf_reference(data, fmt, n, out)),
                      ("cpp", G._dequantize_cpp(data, fmt, n, out)),
                      ("triton", G._dequantize_triton(data, fmt, n, out))):
        assert got.dtype == out
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), f"{name} {fmt} -> {out}"


def test_q4_k_matches_the_ggml_transcription():
    x = awkward(1, 768, seed=2).view(-1)
    x[512:544] *= 50.0  # one sub-block dominating its super-block's scale
    ref = np.frombuffer(quantize_q4_k(x.numpy()), dtype=np.uint8)
    for name, fn in backends("q4_k").items():
        assert np.array_equal(fn(x).numpy(), ref), name


def test_q4_k_gpu_launch_under_interpreter():
    """The GPU's launch (Q4K_GPU_ROWS super-blocks per program) under the interpreter, with a partial
    last program (5 super-blocks, 4 per program), against the ggml transcription."""
    x = awkward(1, 5 * 256, seed=4).view(-1)
    ref = np.frombuffer(quantize_q4_k(x.numpy()), dtype=np.uint8)
    assert G.Q4K_GPU_ROWS == 4
    assert np.array_equal(G._quantize_triton(x, "q4_k", q4k_rows=G.Q4K_GPU_ROWS).numpy(), ref)


def test_q4_k_distributions_match_the_ggml_transcription():
    """Heavy tails, one-signed blocks (the fit's min clamps to 0), sparse and bimodal blocks."""
    g = torch.Generator().manual_seed(7)
    u = torch.rand(256, generator=g) - 0.5
    sbs = [-0.02 * torch.sign(u) * torch.log1p(-2 * u.abs()),          # Laplace
           torch.rand(256, generator=g) * 0.1 + 0.01,             # all positive
           -torch.rand(256, generator=g) * 0.1,                    # all non-positive
           torch.randn(256, generator=g) * (torch.rand(256, generator=g) < 0.1),  # sparse
           torch.where(torch.rand(256, generator=g) < 0.5, -1.0, 1.0) + torch.randn(256, generator=g) * 1e-3,
           torch.randn(256, generator=g) * torch.logspace(-4, 1, 256)]  # scales spanning 5 decades
    x = torch.cat(sbs).float()
    ref = np.frombuffer(quantize_q4_k(x.numpy()), dtype=np.uint8)
    assert np.array_equal(G._quantize_cpp(x, "q4_k").numpy(), ref)
    assert np.array_equal(G.quantize_gguf_reference(x, "q4_k").numpy(), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_q4_k_backends_agree_and_round_trip(dtype):
    x = awkward(9, 512, seed=3).to(dtype)
    outs = {name: fn(x) for name, fn in backends("q4_k").items() if name != "triton"}
    assert torch.equal(outs["torch"], outs["cpp"])
    if dtype == torch.bfloat16:  # the interpreter runs q4_k's sequential loops slowly: one dtype, 3 super-blocks
        assert torch.equal(G._quantize_triton(x.view(-1)[:768], "q4_k"), outs["torch"][: 3 * 144])
    deq = torch.from_numpy(gguf.quants.dequantize(outs["cpp"].numpy().reshape(9, -1), T.Q4_K).reshape(9, 512).copy())
    xf = x.float()
    # per super-block the error is within one 4-bit step of the block's range (q4_k's asymmetric grid)
    rng = (xf.view(-1, 256).amax(1) - xf.view(-1, 256).amin(1).clamp(max=0)).repeat_interleave(256).view(9, 512)
    assert ((deq - xf).abs() <= rng / 15 + 1e-7).all()
    assert torch.equal(deq.view(-1)[:32], torch.zeros(32))  # the zero block stays zero


@pytest.mark.parametrize("fmt", G.GGUF_FORMATS)
def test_ragged_tail_is_zero_padded(fmt):
    """A tensor whose size is not a multiple of the block: the last block is quantized as if
    zero-padded, and dequantization drops the padding."""
    b = G.BLOCK[fmt]
    x = awkward(1, 2 * b + 7, seed=4).view(-1)
    padded = torch.cat([x, torch.zeros(b - 7)])
    want = backends(fmt)["torch"](padded)
    for name, fn in backends(fmt).items():
        assert torch.equal(fn(x), want), name
    q = Q.quantize(x, fmt)
    assert q.data.numel() == 3 * G.TYPE_SIZE[fmt]
    assert torch.equal(q.dequantize(), Q.quantize(padded, fmt).dequantize()[: x.numel()])


@pytest.mark.parametrize("fmt", G.GGUF_FORMATS)
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_public_api_dispatches_and_round_trips(fmt, backend, monkeypatch):
    monkeypatch.setenv("QRU_BACKEND", backend)
    w = awkward(3, 256, seed=5).to(torch.bfloat16)
    q = Q.quantize(w, fmt)
    assert q.fmt == fmt and q.block_size == G.BLOCK[fmt] and q.shape == w.shape and q.dtype == torch.bfloat16
    assert q.nbytes == 768 // G.BLOCK[fmt] * G.TYPE_SIZE[fmt]
    assert np.array_equal(q.data.numpy(), G.quantize_gguf_reference(w, fmt).numpy())
    d = q.dequantize(torch.float32)
    ref = gguf.quants.dequantize(q.data.numpy().reshape(3, -1), TYPES[fmt])
    assert np.array_equal(d.numpy().view(np.uint32), ref.view(np.uint32))


def test_mxfp4_is_not_bitsandbytes_fp4():
    """E2M1 with a power-of-two scale: 1.5 and 6 are exact (bitsandbytes FP4 has other levels)."""
    x = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -6.0] * 4)
    q = Q.quantize(x, "mxfp4")
    assert int(q.data[0]) == 127  # floor(log2 6) - 2 + 127: d = 2**(e - 128) = 0.5, 12 d = 6
    assert torch.equal(q.dequantize(), x)
    nf = Q.quantize(x, "fp4").dequantize()
    assert not torch.equal(nf, x)


def test_mxfp4_exponent_near_powers_of_two():
    """floor(log2 amax) as numpy's fp32 log2 rounds it, just below powers of two too."""
    vals = []
    for k in (-100, -3, 0, 1, 5, 20, 100):
        v = np.float32(2.0 ** k)
        for _ in range(40):
            v = np.nextafter(v, np.float32(0))
            vals.append(v)
    x = torch.tensor(np.repeat(np.array(vals, dtype=np.float32), 32))
    ref = gguf_bytes(x.view(-1, 32), "mxfp4")
    for name, fn in backends("mxfp4").items():
        assert np.array_equal(fn(x).numpy(), ref), name


def test_errors_name_the_problem():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="fixed block of 32"):
        Q.quantize(w, "q4_0", 64)
    with pytest.raises(ValueError, match="fixed block of 256"):
        Q.quantize(w, "q4_k", 32)
    bad = w.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at index \(1, 3\)"):
        Q.quantize(bad, "q8_0")
    with pytest.raises(ValueError, match="overflows q4_0's fp16 block scale"):
        Q.quantize(w * 1e6, "q4_0")
    with pytest.raises(ValueError, match="must be uint8 with 18 bytes"):
        G.dequantize_gguf(torch.zeros(17, dtype=torch.uint8), "q4_0", 32, torch.float32)


def test_block_codes_and_affine_reproduce_dequantize():
    """The survival helpers: per-element codes and block (scale, offset) give the dequantized values."""
    x = awkward(2, 512, seed=6)
    for fmt in G.GGUF_FORMATS:
        data = G.quantize_gguf_reference(x, fmt)
        codes = G.block_codes(data, fmt)
        deq = G.dequantize_gguf_reference(data, fmt, x.numel(), torch.float32)
        if fmt == "mxfp4":
            s, _ = G.block_affine(data, fmt)
            val = s * torch.tensor(G.MXFP4_VALUES, dtype=torch.float32)[codes]
        else:
            s, o = G.block_affine(data, fmt)
            sub = s.shape[1]
            c = codes.view(codes.shape[0], sub, -1).float()
            shift = {"q4_0": 8, "q5_0": 16}.get(fmt, 0)
            val = s[..., None] * (c - shift) + o[..., None]
        assert torch.equal(val.reshape(-1), deq), fmt


def test_q4_k_bytes_equal_libgguf():
    """Two independent routes to llama.cpp's reference Q4_K quantizer agree byte for byte: qru's port
    of ``quantize_row_q4_K_ref`` (every backend's oracle) and ``libgguf``, which the GGUF export uses."""
    import numpy as np

    libgguf = pytest.importorskip("libgguf")
    import gguf

    from qru.quant import quantize

    g = torch.Generator().manual_seed(7)
    cases = [torch.randn(4, 256, generator=g),
             torch.randn(37, 512, generator=g) * torch.rand(37, 1, generator=g) * 3,
             torch.randn(8, 1024, generator=g).pow(3),  # heavy tails
             torch.zeros(2, 256), torch.full((2, 256), 0.5)]
    cases[1][3, 17] = 40.0  # one outlier in a sub-block
    for w in cases:
        ours = quantize(w, "q4_k").data.numpy().tobytes()
        ref = libgguf.quantize_rows(np.ascontiguousarray(w.numpy(), dtype=np.float32),
                                    int(gguf.GGMLQuantizationType.Q4_K))
        assert ours == np.asarray(ref, dtype=np.uint8).tobytes(), tuple(w.shape)

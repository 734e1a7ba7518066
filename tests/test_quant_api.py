"""Public API of qru.quant: layout contract, independent oracles, errors, dispatch."""
import numpy as np
import pytest
import torch

import qru.quant as Q
from qru.kernels import quant4
from qru.kernels._backend import load_cpp_ext
from cpp_helpers import need_cpp

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def unpack(data, n):
    return torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:n]


# ----------------------------------------------------------------------------- layout


def test_4bit_layout_contract():
    """data: flat uint8, (n + 1) // 2 bytes, element 2k in the high nibble of byte k;
    scales: fp32 absmax per block of block_size consecutive flattened elements."""
    w = torch.zeros(3, 43)
    w[0, 0], w[0, 1] = 1.0, -1.0
    q = Q.quantize(w, "nf4", 32)
    assert q.data.dtype == torch.uint8 and q.data.shape == ((129 + 1) // 2,)
    assert q.data[0] == 0xF0  # 1.0 -> code 15 (high), -1.0 -> code 0 (low)
    assert q.scales.dtype == torch.float32 and q.scales.shape == (5,)
    assert q.zeros is None and q.double_quant is None
    assert (q.shape, q.dtype, q.fmt, q.block_size) == (torch.Size([3, 43]), torch.float32, "nf4", 32)
    assert quant4.NF4_CODE[15] == 1.0 and len(quant4.NF4_CODE) == 16
    # odd count: the last low nibble holds the code of 0.0
    assert unpack(q.data, 130)[-1] == 7
    assert unpack(Q.quantize(w, "fp4", 32).data, 130)[-1] == 0


def test_partial_last_block_as_bitsandbytes():
    """The tail block's absmax is max |x| over its own elements, clamped to fp32(1e-38) and
    stored clamped (a full all-zero block stores 0); it dequantizes exactly."""
    w = torch.zeros(64 + 10)
    q = Q.quantize(w, "nf4", 64)
    assert q.scales[0] == 0 and int(q.scales[1].view(torch.int32)) == quant4.TINY_BITS
    assert torch.equal(q.dequantize(), w)
    w[64:] = torch.linspace(-2, 3, 10)
    q = Q.quantize(w, "nf4", 64)
    assert q.scales[1] == 3.0
    assert torch.equal(q.dequantize()[-1], torch.tensor(3.0))


@pytest.mark.parametrize("fmt,shape,bs,scales_shape", [
    ("int4", (6, 256), 128, (6, 2)), ("int4_sym", (2, 3, 96), 64, (6, 2)), ("int8", (5, 33), None, (5,)),
    ("int4", (4, 200), 128, (4, 2))])
def test_int_layout(fmt, shape, bs, scales_shape):
    w = torch.randn(shape)
    q = Q.quantize(w, fmt, bs)
    n = w.numel()
    assert q.data.dtype == torch.uint8 and q.data.shape == ((n if fmt == "int8" else n // 2),)
    assert q.scales.dtype == torch.float32 and q.scales.shape == scales_shape
    assert (q.zeros is not None) == (fmt == "int4")
    if fmt == "int4":
        assert q.zeros.dtype == torch.uint8 and q.zeros.shape == scales_shape and int(q.zeros.max()) <= 15
    assert q.block_size == (shape[-1] if fmt == "int8" else bs)
    assert q.dequantize().shape == w.shape


# ----------------------------------------------------------------------------- oracles


def awq_pseudo_quantize(w, n_bit=4, group=128):
    """llm-awq's pseudo_quantize_tensor (zero_point=True), in the input dtype."""
    shape = w.shape
    w = w.reshape(-1, group)
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    max_int, min_int = 2**n_bit - 1, 0
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    return w.reshape(shape)


@pytest.mark.parametrize("group", [32, 128])
def test_int4_matches_awq_reference(group):
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.01
    w[0, :group] = 0.0
    w[1, :group] = 0.3  # constant positive group: AWQ clips it (documented)
    q = Q.quantize(w, "int4", group)
    assert torch.equal(bits(q.dequantize()), bits(awq_pseudo_quantize(w, group=group)))


@pytest.mark.parametrize("fmt,qmax", [("int4_sym", 7), ("int8", 127)])
def test_symmetric_formats_match_numpy_oracle(fmt, qmax):
    w = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    w[1] = 0.0
    w[2, :8] = [qmax, -qmax, 0.5, -0.5, 1.5, 2.5, -2.5, 3.5]  # ties -> half to even
    group = 64 if fmt == "int4_sym" else None
    q = Q.quantize(torch.from_numpy(w), fmt, group)
    deq = np.empty_like(w)
    for r in range(w.shape[0]):
        s = np.float32(np.abs(w[r]).max()) / np.float32(qmax)
        qi = np.clip(np.round(w[r] / s), -qmax, qmax) if s > 0 else np.zeros_like(w[r])
        deq[r] = qi.astype(np.int32).astype(np.float32) * s  # stored as integers: no -0.0
        if fmt == "int8":
            assert np.array_equal(q.data.view(torch.int8).numpy()[r * 64:(r + 1) * 64], qi.astype(np.int8))
    assert np.array_equal(q.dequantize().numpy().view(np.uint32), deq.view(np.uint32))
    assert np.array_equal(q.dequantize()[2, :8].numpy(), [qmax, -qmax, 0, 0, 2, 2, -2, 4])


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_4bit_codes_are_nearest(fmt):
    """Independent oracle: the code is the nearest codebook value to x / absmax (float64
    brute force), wherever the two nearest are not (numerically) tied."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    q = Q.quantize(w, fmt, 64)
    code = torch.tensor(quant4._TABLES[fmt][0], dtype=torch.float64)
    x = w.double().reshape(-1, 64) / q.scales.double().view(-1, 1)
    dist = (x.reshape(-1, 1) - code.view(1, -1)).abs()
    top2 = dist.topk(2, largest=False)
    clear = (top2.values[:, 1] - top2.values[:, 0]) > 1e-6
    got = code[unpack(q.data, w.numel()).long()]
    assert clear.float().mean() > 0.99
    assert torch.equal(got[clear], code[top2.indices[clear, 0]])


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_round_trip_error_bounds(fmt, dtype):
    w = (torch.randn(8, 256, generator=torch.Generator().manual_seed(2)) * 0.1).to(dtype)
    q = Q.quantize(w, fmt)
    err = (q.dequantize(torch.float32) - w.float()).abs()
    if fmt in ("nf4", "fp4"):
        code = sorted(quant4._TABLES[fmt][0])
        half_gap = max(b - a for a, b in zip(code, code[1:])) / 2
        bound = q.scales.repeat_interleave(64).view(8, 256) * half_gap
    else:
        s = q.scales.view(8, -1)
        bound = s.repeat_interleave(256 // s.shape[1], dim=1) * 0.5
    assert (err <= bound * 1.0001 + 1e-12).all()
    assert q.dequantize().dtype == dtype


def test_double_quant_state_and_nbytes():
    w = torch.randn(512, 512)
    q = Q.quantize(w, "nf4", double_quant=True)
    dq = q.double_quant
    assert q.scales.dtype == torch.uint8 and q.scales.shape == (4096,)
    assert dq.absmax2.shape == (16,) and dq.offset.dim() == 0 and dq.code.shape == (256,) and dq.block_size == 256
    plain = Q.quantize(w, "nf4")
    assert (q.absmax() - plain.scales).abs().max() < 0.01 * plain.scales.max()
    assert q.nbytes < plain.nbytes
    assert plain.nbytes == 512 * 512 // 2 + 4096 * 4
    assert torch.equal(q.to("cpu").dequantize(), q.dequantize())


def test_non_contiguous_and_scalar_inputs():
    w = torch.randn(96, 64)
    assert torch.equal(Q.quantize(w.t(), "int4", 32).data, Q.quantize(w.t().contiguous(), "int4", 32).data)
    s = Q.quantize(torch.tensor(-2.0), "nf4")
    assert s.dequantize().shape == () and s.dequantize() == -2.0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_nonfinite_input_raises(fmt, bad):
    w = torch.randn(4, 64)
    w[1, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at index \(1, 2\)"):
        Q.quantize(w, fmt)


@pytest.mark.parametrize("bs", [48, 16, 8192, 0, -64, 64.0, True, "64"])
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int4_sym"])
def test_invalid_block_size_raises(fmt, bs):
    with pytest.raises(ValueError, match="power of two between 32 and 4096"):
        Q.quantize(torch.randn(4, 64), fmt, bs)


def test_other_bad_inputs():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="int8 is per output channel"):
        Q.quantize(w, "int8", 64)
    with pytest.raises(ValueError, match="must be even"):
        Q.quantize(torch.randn(4, 33), "int4", 32)
    with pytest.raises(ValueError, match="fmt must be one of"):
        Q.quantize(w, "nf3")
    with pytest.raises(TypeError, match="w must be bfloat16, float16 or float32"):
        Q.quantize(w.double(), "nf4")
    with pytest.raises(TypeError, match="w must be bfloat16"):
        Q.quantize(torch.ones(4, 64, dtype=torch.int32), "int8")
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        Q.quantize([[1.0]], "nf4")
    with pytest.raises(ValueError, match="w has no elements"):
        Q.quantize(torch.empty(0, 64), "nf4")
    with pytest.raises(ValueError, match="double_quant applies to nf4/fp4 only"):
        Q.quantize(w, "int4", double_quant=True)
    with pytest.raises(ValueError, match="at least one dimension"):
        Q.quantize(torch.tensor(1.0), "int8")
    with pytest.raises(ValueError, match="overflows float32"):
        Q.quantize(torch.tensor([[3e38, -3e38] * 16]), "int4", 32)
    with pytest.raises(TypeError, match="q must be a QTensor"):
        Q.dequantize(w)
    with pytest.raises(TypeError, match="dtype must be"):
        Q.quantize(w, "nf4").dequantize(torch.int8)


# ----------------------------------------------------------------------------- dispatch


def test_backend_env_forces_path_and_all_agree(monkeypatch):
    need_cpp("quant")
    w = torch.randn(5, 130, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    seen = {}
    for backend in ("torch", "cpp", "triton"):
        monkeypatch.setenv("QRU_BACKEND", backend)
        for fmt in Q.FORMATS:
            x = w[:, :128] if fmt in ("int4", "int4_sym") else w
            q = Q.quantize(x, fmt, 32 if fmt != "int8" else None, double_quant=fmt == "nf4")
            out = (q.data, q.scales, q.dequantize())
            if fmt in seen:
                for a, b in zip(out, seen[fmt]):
                    assert torch.equal(bits(a), bits(b)), (backend, fmt)
            seen[fmt] = out
    monkeypatch.setenv("QRU_BACKEND", "bogus")
    with pytest.raises(ValueError, match="QRU_BACKEND"):
        Q.quantize(w, "nf4")


def test_default_cpu_backend_is_cpp(monkeypatch):
    from qru.kernels._backend import backend_for

    monkeypatch.delenv("QRU_BACKEND", raising=False)
    expected = "cpp" if load_cpp_ext("quant") is not None else "torch"
    assert backend_for(torch.zeros(1), cpp="quant") == expected


def test_without_cpp_extension_falls_back_to_reference(monkeypatch):
    """No compiler: load_cpp_ext returns None (it warns), CPU calls take the torch path and
    give the same bits."""
    import qru.kernels._backend as backend

    monkeypatch.delenv("QRU_BACKEND", raising=False)
    w = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    expect = {fmt: Q.quantize(w, fmt) for fmt in Q.FORMATS}
    monkeypatch.setattr(backend, "load_cpp_ext", lambda name: None)
    assert backend.backend_for(w, cpp="quant") == "torch"
    for fmt, q in expect.items():
        got = Q.quantize(w, fmt)
        assert torch.equal(got.data, q.data) and torch.equal(bits(got.scales), bits(q.scales)), fmt
        assert torch.equal(bits(got.dequantize()), bits(q.dequantize())), fmt
    monkeypatch.setenv("QRU_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="unavailable"):
        Q.quantize(w, "nf4")

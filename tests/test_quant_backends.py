"""Triton (interpreter on CPU) == C++ (AVX-512 and scalar paths) == torch reference, bit for
bit, for every format: random inputs, adversarial ones and hypothesis-generated ones."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qru.kernels import quant4, quant_int
from cpp_helpers import need_cpp
from qru.kernels import machine
from qru.kernels._backend import load_cpp_ext, missing_toolchain

# the interpreter evaluates masked-out lanes too (0/0 for all-zero groups): numpy warns
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FMT4 = ["nf4", "fp4"]
FMTI = ["int4", "int4_sym", "int8"]
FINFO_MAX = {torch.float32: 3.0e38, torch.bfloat16: 3.0e38, torch.float16: 6.0e4}
SUBNORMAL = {torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float16: 3e-6}


@pytest.fixture(scope="module")
def cpp():
    """Whether the C++ kernels take part: wherever a toolchain exists (a failed build fails the test).
    Without one the Triton and reference checks still run: they never hinge on the C++ build."""
    if missing_toolchain() is not None:
        return False
    need_cpp("quant")
    return True


@pytest.fixture(scope="module")
def cpp_only():
    """For the tests of the C++ kernels alone: skipped without a toolchain."""
    need_cpp("quant")


def bits(t):
    return None if t is None else t.contiguous().view(-1).view(torch.uint8)


def assert_same(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    if a.is_floating_point():  # NaN payloads are unspecified (torch's own bf16 casts disagree)
        assert torch.equal(a.isnan(), b.isnan()), what
        a, b = torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b)
    assert torch.equal(bits(a), bits(b)), what


def check_4bit(w, fmt, bs, cpp, scalar_too=True):
    """Quantize + dequantize (all output dtypes) through every backend (C++ where ``cpp``)."""
    ref = quant4.quantize_4bit_reference(w, fmt, bs)
    outs = {"triton": quant4._quantize_triton(w, fmt, bs)}
    if cpp:
        outs["cpp"] = quant4._quantize_cpp(w, fmt, bs)
    if cpp and scalar_too:
        outs["cpp-avx2"] = quant4._quantize_cpp(w, fmt, bs, path="avx2")
        outs["cpp-scalar"] = quant4._quantize_cpp(w, fmt, bs, scalar=True)
    for name, (p, a) in outs.items():
        assert_same(p, ref[0], f"{name} packed")
        assert_same(a, ref[1], f"{name} absmax")
    n = w.numel()
    for dt in DTYPES:
        d = quant4.dequantize_4bit_reference(*ref, fmt, bs, n, dt)
        assert_same(quant4._dequantize_triton(*ref, fmt, bs, n, dt), d, f"triton dequant {dt}")
        if cpp:
            assert_same(quant4._dequantize_cpp(*ref, fmt, bs, n, dt), d, f"cpp dequant {dt}")
        if cpp and scalar_too:
            for path in ("avx2", "scalar"):
                assert_same(quant4._dequantize_cpp(*ref, fmt, bs, n, dt, path=path), d, f"cpp-{path} dequant {dt}")
    return ref


def check_int(w, fmt, group, cpp):
    ref = quant_int.quantize_int_reference(w, fmt, group)
    outs = [("triton", quant_int._quantize_triton(w, fmt, group))]
    if cpp:
        outs += [("cpp", quant_int._quantize_cpp(w, fmt, group)),
                 ("cpp-scalar", quant_int._quantize_cpp(w, fmt, group, scalar=True))]
    for name, out in outs:
        for a, b, what in zip(out, ref, ("data", "scales", "zeros")):
            assert_same(a, b, f"{name} {what}")
    for dt in DTYPES:
        d = quant_int.dequantize_int_reference(*ref, fmt, tuple(w.shape), group, dt)
        assert_same(quant_int._dequantize_triton(*ref, fmt, tuple(w.shape), group, dt), d, f"triton dequant {dt}")
        if cpp:
            assert_same(quant_int._dequantize_cpp(*ref, fmt, tuple(w.shape), group, dt), d, f"cpp dequant {dt}")
            assert_same(quant_int._dequantize_cpp(*ref, fmt, tuple(w.shape), group, dt, scalar=True), d,
                        f"cpp-scalar dequant {dt}")
    return ref


# ----------------------------------------------------------------------------- random


@pytest.mark.parametrize("fmt", FMT4)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs,shape", [(32, (5, 67)), (64, (3, 129)), (128, (1000,)), (256, (2, 300)),
                                      (1024, (3, 1000)), (4096, (2, 4101))])
def test_4bit_random(cpp, fmt, dtype, bs, shape):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(bs)) * 3).to(dtype)
    check_4bit(w, fmt, bs, cpp)


@pytest.mark.parametrize("fmt", FMTI)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group,shape", [(32, (4, 96)), (128, (3, 256)), (128, (2, 3, 200)),
                                         (64, (5, 64)), (32, (130,)), (128, (6, 50))])
def test_int_random(cpp, fmt, dtype, group, shape):
    if fmt == "int8":
        group = None
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 2 + 0.25).to(dtype)
    check_int(w, fmt, group, cpp)


@pytest.mark.parametrize("cols", [1, 33, 100, 257])
def test_int8_any_row_length(cpp, cols):
    """Rows that are not a multiple of the vector width (vector body + scalar tail)."""
    w = torch.randn(7, cols, generator=torch.Generator().manual_seed(3))
    check_int(w, "int8", None, cpp)


# ----------------------------------------------------------------------------- adversarial


def adversarial_4bit(dtype, fmt, bs):
    """Blocks of: zeros; huge values; exact midpoints (fp32 only: x * 1 and x * 2 are exact);
    subnormals; tiny normals; mixed signed zeros; then a partial tail of subnormals."""
    big, sub = FINFO_MAX[dtype], SUBNORMAL[dtype]
    bounds = torch.tensor(quant4._TABLES[fmt][1], dtype=torch.float32)
    g = torch.Generator().manual_seed(bs)
    blocks = [
        torch.zeros(bs),
        torch.randn(bs, generator=g).sign() * big * torch.rand(bs, generator=g),
        torch.full((bs,), big),
        torch.randn(bs, generator=g) * sub,
        torch.full((bs,), -sub),
        torch.randn(bs, generator=g) * 1e-30,
        torch.tensor([0.0, -0.0]).repeat(bs // 2),
    ]
    for scale in (1.0, 2.0, 0.5):
        mid = torch.cat([bounds, -bounds, bounds.nextafter(torch.tensor(2.0)), bounds.nextafter(torch.tensor(-2.0))])
        blk = torch.cat([torch.tensor([1.0]), mid.repeat(bs)])[:bs] * scale
        blocks.append(blk)
    x = torch.cat(blocks + [torch.randn(bs // 2 + 1, generator=g) * sub])
    return x.to(dtype)


@pytest.mark.parametrize("fmt", FMT4)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs", [32, 64, 256])
def test_4bit_adversarial(cpp, fmt, dtype, bs):
    w = adversarial_4bit(dtype, fmt, bs)
    assert torch.isfinite(w).all()
    packed, absmax = check_4bit(w, fmt, bs, cpp)
    assert absmax[0] == 0  # an all-zero full block keeps absmax 0 (bitsandbytes)
    assert absmax[-1].view(torch.int32) == quant4.TINY_BITS or absmax[-1] > 1e-38


@pytest.mark.parametrize("fmt", FMT4)
@pytest.mark.parametrize("bs,n", [(32, 1), (32, 31), (32, 33), (64, 95), (64, 129), (64, 64 * 257 + 63),
                                  (128, 300_001), (4096, 4096 * 3 + 17)])
def test_4bit_paths_awkward_sizes_and_threads(cpp_only, fmt, bs, n):
    """Every quantize and dequantize path (AVX-512, AVX2, scalar: each capped, falling back where
    not compiled) on sizes off the block and vector widths, odd counts, every input dtype, a NaN /
    Inf / 0 absmax, at 1, 2 and 3 threads: the reference's bits."""
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=g) * 0.03
    packed, absmax = quant4.quantize_4bit_reference(w, fmt, bs)
    absmax[0] = 0.0
    if absmax.numel() > 3:
        absmax[1], absmax[2] = float("nan"), float("inf")
    absmax[-1] *= 1e-39  # a subnormal product in the (maybe partial) last block
    n_threads = torch.get_num_threads()
    try:
        for dt in DTYPES:
            x = w.to(dt)
            ref = quant4.quantize_4bit_reference(x, fmt, bs)
            for path in quant4.CPP_PATHS:
                for t in (1, 2, 3):
                    torch.set_num_threads(t)
                    p, a = quant4._quantize_cpp(x, fmt, bs, path=path)
                    assert_same(p, ref[0], f"{path} {dt} {t} threads packed")
                    assert_same(a, ref[1], f"{path} {dt} {t} threads absmax")
        for dt in DTYPES:
            d = quant4.dequantize_4bit_reference(packed, absmax, fmt, bs, n, dt)
            for path in quant4.CPP_PATHS:
                for t in (1, 2, 3):
                    torch.set_num_threads(t)
                    assert_same(quant4._dequantize_cpp(packed, absmax, fmt, bs, n, dt, path=path), d,
                                f"{path} {dt} {t} threads")
    finally:
        torch.set_num_threads(n_threads)


def test_4bit_paths_match_the_cpu(cpp_only):
    """The fastest compiled quantize / dequantize path is the one the CPU's instruction set allows."""
    level = load_cpp_ext("quant").q4_level()
    isa = machine.isa_level()
    assert level == {"amx": 2, "avx512_bf16": 2, "avx512": 2, "avx2": 1}.get(isa, 0), isa


def test_4bit_midpoint_ties_take_lower_code(cpp):
    """x exactly on a midpoint goes to the lower code (torch.bucketize, bitsandbytes)."""
    for fmt in FMT4:
        bounds = torch.tensor(quant4._TABLES[fmt][1], dtype=torch.float32)
        order = quant4._TABLES[fmt][2]
        w = torch.cat([torch.tensor([1.0]), bounds, torch.zeros(64 - 16)])
        packed, _ = check_4bit(w, fmt, 64, cpp)
        codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)[1:16].tolist()
        assert codes == [order[i] for i in range(15)]


def adversarial_int(dtype, cols):
    big, sub = FINFO_MAX[dtype], SUBNORMAL[dtype]
    g = torch.Generator().manual_seed(cols)
    r = lambda: torch.randn(cols, generator=g)  # noqa: E731
    rows = [
        torch.zeros(cols),
        torch.full((cols,), 3.0),                       # constant positive group
        torch.full((cols,), -3.0),
        r().clamp(-3, 3) * (big / 8),                   # huge, max - min still finite
        r() * sub,                                      # subnormals
        torch.full((cols,), sub),
        r() * 1e-30,
        torch.arange(cols).remainder(16).float() - 7.0 + 0.5 * (torch.arange(cols) % 2),  # .5 ties
        torch.tensor([7.0, -7.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5]).repeat(cols // 8 + 1)[:cols],
        torch.tensor([127.0, -127.0, 0.5, -0.5, 1.5, 2.5, 126.5, -126.5]).repeat(cols // 8 + 1)[:cols],
        torch.tensor([0.0, -0.0]).repeat(cols // 2 + 1)[:cols],
    ]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("fmt", FMTI)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int_adversarial(cpp, fmt, dtype):
    w = adversarial_int(dtype, 96)
    assert torch.isfinite(w).all()
    data, scales, zeros = check_int(w, fmt, None if fmt == "int8" else 32, cpp)
    assert torch.isfinite(scales).all()


@pytest.mark.parametrize("fmt", ["int4", "int4_sym"])
def test_int_overflowing_range_is_consistent(cpp, fmt):
    """max - min overflowing fp32 gives an Inf scale in every backend (the API raises)."""
    w = torch.tensor([[3e38, -3e38] * 16])
    _, scales, _ = check_int(w, fmt, 32, cpp)
    assert torch.isfinite(scales).all() == (fmt == "int4_sym")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_surfaces_in_scales(cpp_only, bad):
    """Every backend reports a non-finite input through a non-finite scale."""
    w = torch.randn(4, 64)
    w[2, 5] = bad
    for q in (quant4.quantize_4bit_reference(w, "nf4", 64), quant4._quantize_triton(w, "nf4", 64),
              quant4._quantize_cpp(w, "nf4", 64), quant4._quantize_cpp(w, "nf4", 64, scalar=True)):
        assert not torch.isfinite(q[1][2])  # element (2, 5) is in block 2
        assert torch.isfinite(q[1][[0, 1, 3]]).all()
    w3 = torch.randn(4, 60)
    w3[-1, -1] = bad  # in the partial tail block
    for q in (quant4.quantize_4bit_reference(w3, "nf4", 64), quant4._quantize_triton(w3, "nf4", 64),
              quant4._quantize_cpp(w3, "nf4", 64)):
        assert not torch.isfinite(q[1][-1])
    for fmt in FMTI:
        g = None if fmt == "int8" else 32
        for q in (quant_int.quantize_int_reference(w, fmt, g), quant_int._quantize_triton(w, fmt, g),
                  quant_int._quantize_cpp(w, fmt, g)):
            s = q[1].reshape(4, -1)
            assert not torch.isfinite(s[2, 0]) and torch.isfinite(s[[0, 1, 3]]).all(), fmt


def test_empty_input_kernels(cpp_only):
    w = torch.empty(0)
    for p, a in (quant4.quantize_4bit_reference(w, "nf4", 64), quant4._quantize_cpp(w, "nf4", 64),
                 quant4._quantize_triton(w, "nf4", 64)):
        assert p.numel() == 0 and a.numel() == 0


# ----------------------------------------------------------------------------- hypothesis

F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def float_tensors(draw, even_cols=False):
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 160))
    if even_cols:
        cols += cols % 2
    kind = draw(st.sampled_from(["raw", "normal", "tiny"]))
    dtype = draw(st.sampled_from(DTYPES))
    if kind == "raw":  # any fp32: huge, subnormal, signed zeros
        a = draw(arrays(np.float32, (rows, cols), elements=F32))
        x = torch.from_numpy(a.copy())
    else:
        seed = draw(st.integers(0, 2**31 - 1))
        scale = draw(st.sampled_from([1.0, 1e-3, 1e3])) if kind == "normal" else 1e-39
        x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    x = x.to(dtype)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # fp32 -> fp16 may overflow
    return x


@HYP
@given(w=float_tensors(), fmt=st.sampled_from(FMT4), bs=st.sampled_from([32, 64, 128, 256]))
def test_4bit_property_backends_agree(cpp, w, fmt, bs):
    packed, absmax = check_4bit(w, fmt, bs, cpp, scalar_too=False)
    n = w.numel()
    assert packed.numel() == (n + 1) // 2 and absmax.numel() == math.ceil(n / bs)
    # dequantized magnitudes never exceed the block absmax
    d = quant4.dequantize_4bit_reference(packed, absmax, fmt, bs, n, torch.float32)
    blk = torch.arange(n) // bs
    assert (d.abs() <= absmax[blk]).all()


@HYP
@given(w=float_tensors(even_cols=True), fmt=st.sampled_from(FMTI), group=st.sampled_from([32, 64, 128]))
def test_int_property_backends_agree(cpp, w, fmt, group):
    g = None if fmt == "int8" else group
    _, scales, _ = quant_int.quantize_int_reference(w, fmt, g)
    if not torch.isfinite(scales).all():  # max - min overflow: covered by its own test
        return
    check_int(w, fmt, g, cpp)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMT4 + FMTI)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_triton_matches_cpu_reference(fmt, dtype):
    """On a GPU the Triton kernels must reproduce the CPU reference bit for bit (normal
    range; see docs/formats.md for subnormals)."""
    w = (torch.randn(37, 256, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    group = None if fmt == "int8" else 64
    if fmt in FMT4:
        ref = quant4.quantize_4bit_reference(w, fmt, 64)
        got = quant4._quantize_triton(w.cuda(), fmt, 64)
        deq = quant4._dequantize_triton(got[0], got[1], fmt, 64, w.numel(), dtype)
        expect = quant4.dequantize_4bit_reference(*ref, fmt, 64, w.numel(), dtype)
    else:
        ref = quant_int.quantize_int_reference(w, fmt, group)
        got = quant_int._quantize_triton(w.cuda(), fmt, group)
        deq = quant_int._dequantize_triton(*got, fmt, tuple(w.shape), group, dtype)
        expect = quant_int.dequantize_int_reference(*ref, fmt, tuple(w.shape), group, dtype)
    for a, b in zip(got, ref):
        assert_same(None if a is None else a.cpu(), b, fmt)
    assert_same(deq.cpu(), expect, f"{fmt} dequant")

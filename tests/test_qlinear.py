"""QuantLinear / qmatmul: every path against the reference (dequantize to the compute dtype,
then F.linear), quantize_model against weights replaced by dequantize(quantize(W)), module
swap semantics, dispatch forcing and errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qru.quant as Q
from qru.kernels import qmatmul
from qru.kernels._backend import load_cpp_ext
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.quant.qlinear import QuantLinear, is_skipped

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# output rounding allowance (relative to |y|): each side rounds once to the output dtype
OUT_TOL = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
# (out, in) shapes: awkward ones per format (nf4/fp4/int8 accept odd in; int4 formats need even)
SHAPES = {
    "nf4": [(33, 130), (7, 13), (64, 96), (5, 200)],
    "fp4": [(33, 130), (7, 13), (64, 96)],
    "int4": [(33, 130), (7, 14), (64, 200)],
    "int4_sym": [(33, 130), (7, 14), (64, 200)],
    "int8": [(33, 130), (7, 13), (64, 96)],
}
ROWS = [1, 3, 8, 17]


def _block(fmt):
    return None if fmt == "int8" else 32


def _packed(q):
    return q.data, (q.absmax() if q.fmt in ("nf4", "fp4") else q.scales), q.zeros


def assert_linear_close(y, ref, x, w):
    """|y - ref| <= K * 2^-23 * (|x| @ |W|^T) + out-dtype rounding: the two differ only in
    fp32 summation order and in where they round to the output dtype."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    bound = x.double().abs().reshape(-1, x.shape[-1]) @ w.double().abs().T
    tol = x.shape[-1] * 2.0 ** -23 * bound.reshape(ref.shape) + OUT_TOL[ref.dtype] * ref.double().abs() + 1e-30
    err = (y.double() - ref.double()).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"


def make_q(fmt, shape, seed=0, double_quant=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.5
    return Q.quantize(w, fmt, _block(fmt), double_quant=double_quant)


@pytest.fixture(scope="module")
def cpp():
    ext = load_cpp_ext("qmatmul")
    if ext is None:
        pytest.skip("no C++ compiler")
    return ext


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_fused_equals_reference(cpp, fmt, dtype):
    for i, (n, k) in enumerate(SHAPES[fmt]):
        q = make_q(fmt, (n, k), seed=i)
        data, scales, zeros = _packed(q)
        w = q.dequantize(dtype)
        g = torch.Generator().manual_seed(100 + i)
        bias = torch.randn(n, generator=g).to(dtype)
        for m, b in ((1, None), (3, bias), (8, bias)):
            x = torch.randn(m, k, generator=g).to(dtype)
            ref = qmatmul.quant_linear_reference(x, data, scales, zeros, fmt, q.block_size, n, k, b)
            assert torch.equal(ref, F.linear(x, w, b))  # the oracle is dequantize + F.linear
            for scalar in (False, True):
                y = qmatmul._quant_linear_cpp_fused(x, data, scales, zeros, fmt, q.block_size, n, b, scalar)
                assert_linear_close(y, ref, x, w)


def test_cpp_fused_every_row_count(cpp):
    """Each compiled row count 1..8 (and the scalar path) against the reference."""
    for fmt, dtype in (("nf4", torch.bfloat16), ("int8", torch.float32), ("int4", torch.float16)):
        n, k = SHAPES[fmt][0]
        q = make_q(fmt, (n, k), seed=7)
        data, scales, zeros = _packed(q)
        w = q.dequantize(dtype)
        for m in range(1, qmatmul.FUSED_MAX_ROWS + 1):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
            ref = qmatmul.quant_linear_reference(x, data, scales, zeros, fmt, q.block_size, n, k)
            for scalar in (False, True):
                y = qmatmul._quant_linear_cpp_fused(x, data, scales, zeros, fmt, q.block_size, n, None, scalar)
                assert_linear_close(y, ref, x, w)


@pytest.mark.parametrize("fmt,block,shape", [("nf4", 64, (9, 256)), ("nf4", 128, (5, 389)), ("int4", 64, (6, 320)),
                                              ("int4_sym", 128, (3, 512))])
def test_cpp_fused_long_blocks_bf16(cpp, fmt, block, shape):
    """bf16 activations, every row count, blocks of 64/128 (the AVX512-BF16 path's two-chain
    loop over 64 weights, and for odd in_features blocks starting on a low nibble)."""
    n, k = shape
    g = torch.Generator().manual_seed(11)
    q = Q.quantize(torch.randn(shape, generator=g) * 0.5, fmt, block)
    data, scales, zeros = _packed(q)
    w = q.dequantize(torch.bfloat16)
    for m in range(1, qmatmul.FUSED_MAX_ROWS + 1):
        x = torch.randn(m, k, generator=g).bfloat16()
        ref = qmatmul.quant_linear_reference(x, data, scales, zeros, fmt, q.block_size, n, k)
        for scalar in (False, True):
            assert_linear_close(qmatmul._quant_linear_cpp_fused(x, data, scales, zeros, fmt, q.block_size, n, None,
                                                                scalar), ref, x, w)


def test_cpp_fused_uses_exact_weights(cpp):
    """One-hot activations read single weights: the fused path's weight values equal the
    reference dequantization bit for bit (the table holds round(code * absmax))."""
    for fmt in Q.FORMATS:
        n, k = SHAPES[fmt][0]
        q = make_q(fmt, (n, k), seed=3, double_quant=fmt in ("nf4", "fp4"))
        data, scales, zeros = _packed(q)
        for dtype in DTYPES:
            w = q.dequantize(dtype)
            for col in (0, 1, k // 2, k - 1):
                x = torch.zeros(1, k, dtype=dtype)
                x[0, col] = 1
                for scalar in (False, True):
                    y = qmatmul._quant_linear_cpp_fused(x, data, scales, zeros, fmt, q.block_size, n, None, scalar)
                    assert torch.equal(y[0], w[:, col]), (fmt, dtype, col, scalar)


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_triton_interpreter_equals_reference(fmt):
    n, k = SHAPES[fmt][0]
    q = make_q(fmt, (n, k), seed=5)
    data, scales, zeros = _packed(q)
    g = torch.Generator().manual_seed(6)
    for dtype in DTYPES:
        w = q.dequantize(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        for m in (1, 20):
            x = torch.randn(m, k, generator=g).to(dtype)
            ref = qmatmul.quant_linear_reference(x, data, scales, zeros, fmt, q.block_size, n, k, bias)
            y = qmatmul._quant_linear_triton(x, data, scales, zeros, fmt, q.block_size, n, bias, config=(16, 32, 32))
            assert_linear_close(y, ref, x, w)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_qru_backend_forcing(monkeypatch, backend, cpp):
    q = make_q("nf4", (33, 130))
    data, scales, zeros = _packed(q)
    calls = []
    for fn in ("_quant_linear_cpp_fused", "_quant_linear_triton"):
        orig = getattr(qmatmul, fn)
        monkeypatch.setattr(qmatmul, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    monkeypatch.setenv("QRU_BACKEND", backend)
    x = torch.randn(2, 130)
    y = qmatmul.quant_linear(x, data, scales, zeros, "nf4", 32, 33, 130)
    ref = qmatmul.quant_linear_reference(x, data, scales, zeros, "nf4", 32, 33, 130)
    expect = {"torch": [], "cpp": ["_quant_linear_cpp_fused"], "triton": ["_quant_linear_triton"]}[backend]
    assert calls == expect
    if backend == "torch":
        assert torch.equal(y, ref)
    assert_linear_close(y, ref, x, q.dequantize())
    # many rows on the C++ backend: dequantize + F.linear (no fused call), same as the reference
    calls.clear()
    if backend == "cpp":
        x = torch.randn(40, 130)
        y = qmatmul.quant_linear(x, data, scales, zeros, "nf4", 32, 33, 130)
        assert calls == [] and torch.equal(y, qmatmul.quant_linear_reference(x, data, scales, zeros, "nf4", 32, 33,
                                                                              130))


def test_unknown_backend_raises(monkeypatch):
    q = make_q("int8", (4, 8))
    monkeypatch.setenv("QRU_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="QRU_BACKEND"):
        qmatmul.quant_linear(torch.randn(1, 8), *_packed(q), "int8", None, 4, 8)


def test_kernel_argument_errors():
    q = make_q("nf4", (4, 64))
    data, scales, zeros = _packed(q)
    with pytest.raises(ValueError, match="fmt"):
        qmatmul.quant_linear(torch.randn(1, 64), data, scales, zeros, "nf3", 32, 4, 64)
    with pytest.raises(ValueError, match="features"):
        qmatmul.quant_linear(torch.randn(1, 63), data, scales, zeros, "nf4", 32, 4, 64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        qmatmul.quant_linear(torch.ones(1, 64, dtype=torch.int32), data, scales, zeros, "nf4", 32, 4, 64)
    with pytest.raises(ValueError, match="bias"):
        qmatmul.quant_linear(torch.randn(1, 64), data, scales, zeros, "nf4", 32, 4, 64, torch.zeros(5))


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_linear_forward_equals_reference(fmt, dtype):
    out_f, in_f = SHAPES[fmt][0]
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=True)
    ql = QuantLinear.from_linear(lin, fmt, _block(fmt), compute_dtype=dtype)
    q = Q.quantize(lin.weight.detach(), fmt, _block(fmt))
    assert torch.equal(ql.qweight, q.data) and torch.equal(ql.scales, q.scales)
    w = q.dequantize(dtype)
    assert torch.equal(ql.dequantize_weight(), w)
    b = lin.bias.detach().to(dtype)
    for rows in ROWS:
        x = torch.randn(rows, in_f).to(dtype)
        with torch.no_grad():
            y = ql(x)
        assert_linear_close(y, F.linear(x, w, b), x, w)
    # leading dims, and an input in another dtype comes back in that dtype
    x = torch.randn(2, 3, in_f)
    with torch.no_grad():
        y = ql(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, out_f)
    ref = F.linear(x.to(dtype), w, b)
    assert_linear_close(y.to(dtype), ref, x.to(dtype), w)


def test_quant_linear_double_quant_and_cache():
    torch.manual_seed(1)
    lin = nn.Linear(130, 33)
    ql = QuantLinear.from_linear(lin, "nf4", 32, double_quant=True, compute_dtype=torch.float32)
    q = Q.quantize(lin.weight.detach(), "nf4", 32, double_quant=True)
    assert ql.scales.dtype == torch.uint8 and torch.equal(ql.fp32_scales(), q.absmax())
    assert ql.fp32_scales() is ql.fp32_scales()  # decoded once
    x = torch.randn(1, 130)
    w = q.dequantize(torch.float32)
    with torch.no_grad():
        assert_linear_close(ql(x), F.linear(x, w, lin.bias.detach()), x, w)
    assert "double_quant=True" in repr(ql)


def test_quant_linear_grad_flows_to_input():
    torch.manual_seed(2)
    lin = nn.Linear(64, 16)
    ql = QuantLinear.from_linear(lin, "int4", 32, compute_dtype=torch.float32)
    w = ql.dequantize_weight()
    x = torch.randn(2, 64, requires_grad=True)
    ql(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w, lin.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_to_dtype_keeps_packed_buffers():
    torch.manual_seed(3)
    ql = QuantLinear.from_linear(nn.Linear(64, 16), "nf4", 64, double_quant=True, compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in ql.state_dict().items()}
    ql.to(torch.bfloat16)
    assert ql.compute_dtype == torch.bfloat16 and ql.bias.dtype == torch.bfloat16
    for k in ("qweight", "scales", "absmax2", "offset", "code2"):
        assert torch.equal(getattr(ql, k), before[k]) and getattr(ql, k).dtype == before[k].dtype, k
    ql.float()
    assert ql.compute_dtype == torch.float32
    ql.to("cpu")
    assert ql.compute_dtype == torch.float32


# ----------------------------------------------------------------------------- quantize_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig.preset("tiny", vocab_size=128, attention_bias=True)
    return Llama(cfg).eval()


def _reference_model(model, fmt, bs, double_quant=False, skip=("lm_head",)):
    ref = copy.deepcopy(model)
    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear) and not is_skipped(name, skip):
            q = Q.quantize(m.weight.detach(), fmt, bs, double_quant=double_quant)
            m.weight.data = q.dequantize(torch.float32)
    return ref


@pytest.mark.parametrize("fmt,dq", [("nf4", False), ("nf4", True), ("fp4", True), ("int4", False),
                                    ("int4_sym", False), ("int8", False)])
def test_quantize_model_round_trip(tiny, fmt, dq):
    """quantize_model(model) logits == model with each weight replaced by dequantize(quantize(W))."""
    bs = None if fmt == "int8" else 64
    qm = Q.quantize_model(copy.deepcopy(tiny), fmt, bs, double_quant=dq)
    ref = _reference_model(tiny, fmt, bs, dq)
    kinds = {type(m).__name__ for n, m in qm.named_modules() if n.endswith("_proj")}
    assert kinds == {"QuantLinear"} and isinstance(qm.lm_head, nn.Linear)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # 18 rows: dequantize + F.linear, the same op sequence as the reference: bit-equal
        assert torch.equal(qm(ids), ref(ids))
        # one token (decode): fused path, fp32 summation order only
        a, b = qm(ids[:1, :1]), ref(ids[:1, :1])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert qm.config.quantization_config["quant_method"] == ("bitsandbytes" if fmt in ("nf4", "fp4") else "qru")


def test_quantize_model_quantizes_fp32_weights_and_casts_rest(tiny):
    qm = Q.quantize_model(copy.deepcopy(tiny), "nf4", compute_dtype="bf16")
    q_ref = Q.quantize(tiny.model.layers[0].mlp.up_proj.weight.detach(), "nf4", 64)  # from fp32
    ql = qm.model.layers[0].mlp.up_proj
    assert torch.equal(ql.qweight, q_ref.data) and torch.equal(ql.scales, q_ref.scales)
    assert ql.weight_dtype == torch.float32 and ql.compute_dtype == torch.bfloat16
    assert qm.model.embed_tokens.weight.dtype == torch.bfloat16 and qm.lm_head.weight.dtype == torch.bfloat16
    assert ql.scales.dtype == torch.float32
    assert qm.config.torch_dtype == "bfloat16"
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        assert qm(ids).dtype == torch.bfloat16


def test_skip_matching(tiny):
    assert is_skipped("lm_head", ["lm_head"]) and is_skipped("model.layers.0.mlp.up_proj", ["mlp"])
    assert is_skipped("model.layers.1.mlp.up_proj", ["layers.1.mlp"])
    assert not is_skipped("model.layers.0.self_attn.q_proj", ["proj"])
    assert not is_skipped("model.layers.11.mlp.up_proj", ["layers.1"])
    qm = Q.quantize_model(copy.deepcopy(tiny), "int8", skip=("lm_head", "mlp"))
    for name, m in qm.named_modules():
        if name.endswith("_proj"):
            assert isinstance(m, QuantLinear) == ("mlp" not in name), name
    qm = Q.quantize_model(copy.deepcopy(tiny), "int8", skip=())
    assert isinstance(qm.lm_head, QuantLinear)


def test_quantize_model_errors_leave_model_untouched(tiny):
    m = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match="unknown quantization format 'nf3'"):
        Q.quantize_model(m, "nf3")
    with pytest.raises(ValueError, match="block size 48 does not fit nf4"):
        Q.quantize_model(m, "nf4", 48)
    with pytest.raises(ValueError, match="double_quant"):
        Q.quantize_model(m, "int4", double_quant=True)
    m.model.layers[1].self_attn.v_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight has 1 non-finite"):
        Q.quantize_model(m, "nf4")
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    # int4 on an odd in_features names the module
    odd = Llama(LlamaConfig.preset("tiny", vocab_size=64, intermediate_size=175)).eval()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: in_features=175 is odd"):
        Q.quantize_model(odd, "int4")
    Q.quantize_model(odd, "nf4")  # nf4 flattens: fine
    # a tied lm_head cannot be quantized apart from the embedding
    tied = Llama(LlamaConfig.preset("tiny", vocab_size=64, tie_word_embeddings=True)).eval()
    with pytest.raises(ValueError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        Q.quantize_model(tied, "nf4", skip=())


def test_int8_ignores_block_size_and_eval_at_precisions(tmp_path, tiny):
    """precision.py calls quantize_model(model, fmt, 64) for every format; int8 ignores the block."""
    from qru.eval.precision import eval_at_precisions

    tiny.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    seen = {}

    def fn(model, precision):
        with torch.no_grad():
            seen[precision] = model(ids)
        fmts = {m.fmt for m in model.modules() if isinstance(m, QuantLinear)}
        return {"fmts": sorted(fmts)}

    recs = eval_at_precisions(tmp_path / "m", None, ["nf4", "int8"], fn)
    assert [r["precision"] for r in recs] == ["nf4", "int8"]
    assert [r["fmts"] for r in recs] == [["nf4"], ["int8"]]
    for p, bs in (("nf4", 64), ("int8", None)):
        with torch.no_grad():
            assert torch.equal(seen[p], _reference_model(tiny, p, bs)(ids))


def test_greedy_generation_on_quantized_model(tiny):
    """KV-cache decode (one row per step: the fused kernel) generates what the model with
    dequantize(quantize(W)) weights generates, and a cached decode step's logits agree."""
    from qru.model.generate import generate_ids

    qm = Q.quantize_model(copy.deepcopy(tiny), "nf4", 64, double_quant=True)
    ref = _reference_model(tiny, "nf4", 64, True)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    a = generate_ids(qm, prompt, max_new_tokens=12)
    b = generate_ids(ref, prompt, max_new_tokens=12)
    assert torch.equal(a, b)
    with torch.no_grad():  # one cached decode step: the fused kernel
        cq, cr = qm.new_cache(1, 32), ref.new_cache(1, 32)
        qm(a[:, :-1], cache=cq), ref(a[:, :-1], cache=cr)
        torch.testing.assert_close(qm(a[:, -1:], cache=cq), ref(a[:, -1:], cache=cr), rtol=1e-5, atol=1e-5)

"""qru.kernels.linear: the one linear dispatch. Each path against F.linear (values and gradients,
fp64 oracle), the packed-weight cache and its invalidation, QRU_BACKEND forcing, the per-machine
calibration honoured, the weight-transform seam of qru.model.linear.Linear, and that nothing in
qru replaces a module's ``forward``."""
import copy
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qru.kernels import calibrate
from qru.kernels import linear as KL
from qru.kernels.bf16_linear import skinny_rows
from qru.model.linear import Linear, set_weight_transform

needs_onednn = pytest.mark.skipif(not KL.packing_available(), reason="this torch build has no oneDNN packing")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, one_thread):
    """One thread, no forced backend, oneDNN picked for both choices (whatever this machine's
    calibration says); tests that need otherwise set it."""
    for var in ("QRU_BACKEND", "QRU_PACKED_MAX_BYTES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QRU_DENSE_FP32", "onednn")
    monkeypatch.setenv("QRU_PACKED_FP32", "onednn")
    monkeypatch.setenv("QRU_PACKED_BF16", "onednn")


def _data(M=6, K=24, N=10, bias=True, dtype=torch.float32, lead=()):
    g = torch.Generator().manual_seed(M * 100 + K)
    x = torch.randn(*lead, M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def _ref64(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def _close(got, want, K):
    tol = 2e-6 * K ** 0.5 * 4
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


# -- each path against F.linear -------------------------------------------------------------------

@needs_onednn
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_path_values_and_grads(lead, bias):
    x, w, b = _data(lead=lead, bias=bias)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    assert KL.choose(x, w, b) == "dense"
    y = KL.linear(x, w, b)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(gy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    yr = F.linear(ref[0], ref[1], ref[2] if bias else None)
    yr.backward(gy.double())
    _close(y.detach(), yr.detach(), x.shape[-1])
    for t, r in zip(leaves, ref):
        _close(t.grad, r.grad, max(x.shape[-1], 18))


@needs_onednn
def test_packed_path_values_and_cache():
    x, w, b = _data()
    slot = KL.PackedWeight()
    with torch.no_grad():
        assert KL.choose(x, w, b, slot) == "packed"
        y = KL.linear(x, w, b, slot)
        assert slot.packed
        _close(y, _ref64(x, w, b), 24)
        xs = torch.randn(3, 9, 24)[:, 2:6]  # 3-D, not contiguous
        _close(KL.linear(xs, w, b, slot), _ref64(xs, w, b), 24)
        assert KL.choose(x, w, b, None) == "dense"  # no slot: nothing to cache the packed copy in
        assert KL.choose(x[:1], w, b, slot) == "torch"  # one row: MKL's GEMV
    # gradients needed: the differentiable dense path, not the packed copy
    xg = x.clone().requires_grad_()
    assert KL.choose(xg, w, b, slot) == "dense"
    KL.linear(xg, w, b, slot).sum().backward()
    _close(xg.grad, w.double().sum(0).expand(6, 24), 24)


@needs_onednn
def test_the_optimizer_hook_is_registered_only_when_a_trainable_weight_is_packed():
    """Importing qru (or the linear dispatch) registers no global torch.optim hook; packing a
    trainable weight does, once, and its copy still follows the steps taken from then on."""
    code = """
import torch, torch.optim.optimizer as O
import qru.kernels.linear as KL
from qru.model.linear import Linear
assert not O._global_optimizer_post_hooks, "registered at import"
lin = Linear(24, 10)
opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
frozen = Linear(24, 10).requires_grad_(False)
x = torch.randn(5, 24)
with torch.no_grad():
    frozen(x)
assert not O._global_optimizer_post_hooks, "registered for a frozen weight"
with torch.no_grad():
    lin(x)
assert lin.packed_weight.packed and len(O._global_optimizer_post_hooks) == 1
lin(x).sum().backward()
opt.step()
with torch.no_grad():
    y = lin(x)
ref = (x.double() @ lin.weight.detach().double().t() + lin.bias.detach().double()).float()
assert torch.allclose(y, ref, atol=1e-5), "stale packed copy after a fused step"
assert len(O._global_optimizer_post_hooks) == 1
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "QRU_PACKED_FP32": "onednn", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


@needs_onednn
@pytest.mark.parametrize("fused", [False, True])  # fused AdamW does not bump the weight's _version
def test_packed_copy_follows_the_weight_after_an_optimizer_step(fused):
    torch.manual_seed(0)
    lin = Linear(24, 10)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=fused)
    x = torch.randn(5, 24)
    with torch.no_grad():
        before = lin(x)
    assert lin.packed_weight.packed
    held = KL.packed_bytes()
    lin(x).square().sum().backward()  # a training step: grads through the dense path
    opt.step()
    lin(x)  # the next call (with gradients: not packed) sees the copy stale and frees it
    assert not lin.packed_weight.packed and KL.packed_bytes() == held - 24 * 10 * 4
    with torch.no_grad():
        after = lin(x)
    assert lin.packed_weight.packed
    assert not torch.allclose(after, before)
    _close(after, _ref64(x, lin.weight.detach(), lin.bias.detach()), 24)
    # an optimizer step between two calls without gradients (no grad-mode call in between)
    lin(x).sum().backward()
    with torch.no_grad():
        lin(x)
    opt.step()
    with torch.no_grad():
        _close(lin(x), _ref64(x, lin.weight.detach(), lin.bias.detach()), 24)
    # a frozen weight keeps its packed copy across other parameters' optimizer steps
    frozen = Linear(24, 10).requires_grad_(False)
    with torch.no_grad():
        frozen(x)
        packed = frozen.packed_weight.get(frozen.weight)
    opt.step()
    assert frozen.packed_weight.get(frozen.weight) is packed
    # replaced in place by load_state_dict, and moved to another dtype and back: repacked
    sd = {k: v * -1 for k, v in lin.state_dict().items()}
    lin.load_state_dict(sd)
    with torch.no_grad():
        _close(lin(x), _ref64(x, sd["weight"], sd["bias"]), 24)
        lin.double().float()
        _close(lin(x), _ref64(x, sd["weight"], sd["bias"]), 24)


@needs_onednn
def test_packed_budget(monkeypatch):
    x, w, b = _data()
    slot = KL.PackedWeight()
    monkeypatch.setenv("QRU_PACKED_MAX_BYTES", str(KL.packed_bytes() + w.numel() * 4 - 1))
    with torch.no_grad():
        assert KL.choose(x, w, b, slot) == "dense"  # one byte short
        monkeypatch.setenv("QRU_PACKED_MAX_BYTES", str(KL.packed_bytes() + w.numel() * 4))
        assert KL.choose(x, w, b, slot) == "packed"
        KL.linear(x, w, b, slot)
    held = KL.packed_bytes()
    del slot
    assert KL.packed_bytes() == held - w.numel() * 4
    monkeypatch.setenv("QRU_PACKED_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="QRU_PACKED_MAX_BYTES='lots'"):
        KL.packed_max_bytes()


@pytest.mark.parametrize("M", [2, 40])
def test_bf16_path(M):
    x, w, b = _data(M=M, K=64, N=33, dtype=torch.bfloat16)
    with torch.no_grad():
        assert KL.choose(x, w, b) == "bf16"
        y = KL.linear(x, w, b)
    assert y.dtype == torch.bfloat16
    # fp32 accumulation of exact bf16 products, rounded once: within one bf16 rounding of fp64
    ref = _ref64(x, w, b)
    assert ((y.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()
    xg = x.clone().requires_grad_()
    assert KL.choose(xg, w, b) == "torch"  # bf16 with gradients: F.linear
    assert torch.equal(KL.linear(xg, w, b), F.linear(xg, w, b))


@needs_onednn
@pytest.mark.parametrize("M", [8, 40])
def test_packed_bf16_path(M, monkeypatch):
    """bf16 inference above PACKED_BF16_MIN_ROWS rows with a slot: oneDNN on the packed weight where
    the calibration (here forced) picks it; equal to the bf16 GEMM up to one bf16 rounding; the copy
    follows an in-place weight change; few rows, gradients, several threads or the other pick do not
    take it."""
    x, w, b = _data(M=M, K=64, N=33, dtype=torch.bfloat16)
    slot = KL.PackedWeight()
    with torch.no_grad():
        assert KL.choose(x, w, b, slot) == "packed"
        y = KL.linear(x, w, b, slot)
        assert slot.packed and y.dtype == torch.bfloat16 and y.shape == (M, 33)
        ref = _ref64(x, w, b)
        assert ((y.double() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-2).all()
        x3 = x.view(2, M // 2, 64)  # leading dims as a decode step passes them
        assert torch.equal(KL.linear(x3, w, b, slot), y.view(2, M // 2, 33))
        w.mul_(-1)  # in place: the packed copy is stale and must be rebuilt
        y2 = KL.linear(x, w, b, slot)
        ref2 = _ref64(x, w, b)
        assert ((y2.double() - ref2).abs() <= ref2.abs() * 2 ** -7 + 1e-2).all()
        assert KL.choose(x[:KL.PACKED_BF16_MIN_ROWS], w, b, slot) == "bf16"  # the skinny kernel's rows
        assert KL.choose(x, w, b) == "bf16"  # no slot
        monkeypatch.setenv("QRU_PACKED_BF16", "torch")
        assert KL.choose(x, w, b, slot) == "bf16"
        monkeypatch.setenv("QRU_PACKED_BF16", "onednn")
        torch.set_num_threads(2)
        try:
            assert KL.choose(x, w, b, slot) == "bf16"
        finally:
            torch.set_num_threads(1)
    assert KL.choose(x.clone().requires_grad_(), w, b, slot) == "torch"


def test_torch_path_cases():
    x, w, b = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert KL.choose(x, w, b) == "torch"  # autocast decides the dtype: F.linear under it
        assert torch.equal(KL.linear(x, w, b), F.linear(x, w, b))
    assert KL.choose(x.double(), w.double(), b.double()) == "torch"
    assert KL.choose(x, w, b.double()) == "torch"
    assert KL.choose(x[:1], w, b) == "torch"
    assert KL.choose(x[:0], w, b) == "torch"


# -- QRU_BACKEND and the calibration ---------------------------------------------------------------

def test_qru_backend_torch_forces_f_linear(monkeypatch):
    monkeypatch.setenv("QRU_BACKEND", "torch")
    slot = KL.PackedWeight()
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = _data(dtype=dtype)
        with torch.no_grad():
            assert KL.choose(x, w, b, slot) == "torch"
            assert torch.equal(KL.linear(x, w, b, slot), F.linear(x, w, b))
    assert not slot.packed


def test_qru_backend_triton_and_cpp(monkeypatch):
    x, w, b = _data()
    monkeypatch.setenv("QRU_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert KL.choose(x, w, b) == "torch"  # no Triton GEMM: F.linear is the implementation
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="QRU_BACKEND=triton needs a CUDA tensor"):
        KL.linear(x, w, b)
    monkeypatch.setenv("QRU_BACKEND", "cpp")
    xb, wb, bb = _data(M=2, K=64, N=8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert KL.choose(xb, wb, bb) == "bf16" and xb.shape[0] <= skinny_rows()


@needs_onednn
def test_calibration_choice_is_honoured(monkeypatch, tmp_path):
    """Unforced, each fp32 path follows what the (here faked) per-machine measurement picked."""
    monkeypatch.delenv("QRU_DENSE_FP32")
    monkeypatch.delenv("QRU_PACKED_FP32")
    monkeypatch.setenv("QRU_CACHE", str(tmp_path))
    secs = {"dense_fp32": {"torch": 0.010, "onednn": 0.005}, "packed_fp32": {"torch": 0.010, "onednn": 0.005}}
    for choice in secs:
        cands, default, _, _ = calibrate.CHOICES[choice]
        monkeypatch.setitem(calibrate.CHOICES, choice, (cands, default, lambda c=choice: dict(secs[c]), lambda: True))
    calibrate.clear_memo()
    try:
        x, w, b = _data()
        slot = KL.PackedWeight()
        assert KL.choose(x, w, b) == "dense"
        with torch.no_grad():
            assert KL.choose(x, w, b, slot) == "packed"
        secs["packed_fp32"] = {"torch": 0.001, "onednn": 0.010}
        calibrate.decide("packed_fp32", recalibrate=True)
        with torch.no_grad():
            assert KL.choose(x, w, b, slot) == "dense"
        secs["dense_fp32"] = {"torch": 0.001, "onednn": 0.010}
        calibrate.decide("dense_fp32", recalibrate=True)
        assert KL.choose(x, w, b) == "torch"
        monkeypatch.setenv("QRU_DENSE_FP32", "onednn")  # an override beats the measurement
        assert KL.choose(x, w, b) == "dense"
        # with two threads, a GEMM this small stays with torch (a descheduled thread stalls oneDNN)
        torch.set_num_threads(2)
        try:
            assert KL.choose(x, w, b) == "torch"
            with torch.no_grad():
                assert KL.choose(x, w, b, slot) == "torch"  # packed only with one thread
        finally:
            torch.set_num_threads(1)
    finally:
        calibrate.clear_memo()


# -- the model's Linear -----------------------------------------------------------------------------

def test_linear_keeps_nn_linear_names_and_copies_get_empty_slots():
    torch.manual_seed(0)
    lin = Linear(24, 10)
    ref = torch.nn.Linear(24, 10)
    assert list(lin.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(5, 24)
    with torch.no_grad():
        _close(lin(x), _ref64(x, ref.weight, ref.bias), 24)
        twin = copy.deepcopy(lin)
        assert not twin.packed_weight.packed or not KL.packing_available()
        _close(twin(x), _ref64(x, ref.weight, ref.bias), 24)


def test_weight_transform_seam():
    torch.manual_seed(0)
    lin = Linear(24, 10)
    x = torch.randn(5, 24)
    calls = []

    def double(layer, w):
        calls.append(layer)
        return w * 2

    set_weight_transform(lin, double)
    assert "weight_transform='double'" in repr(lin)
    y = lin(x)
    assert calls == [lin]
    _close(y.detach(), _ref64(x, 2 * lin.weight.detach(), lin.bias.detach()), 24)
    y.sum().backward()  # through the transform: d/dW sum(x (2W)ᵀ) = 2 · column sums of x
    _close(lin.weight.grad, 2 * x.double().sum(0).expand(10, 24), 24)
    with torch.no_grad():
        lin(x)
    assert not lin.packed_weight.packed  # a transformed weight is never packed
    set_weight_transform(lin, None)
    with torch.no_grad():
        _close(lin(x), _ref64(x, lin.weight, lin.bias), 24)
    with pytest.raises(TypeError, match="needs a qru Linear or LoRALinear, got Linear"):
        set_weight_transform(torch.nn.Linear(2, 2), double)
    with pytest.raises(TypeError, match="must be callable"):
        set_weight_transform(lin, 3)


@needs_onednn
def test_concurrent_callers_do_not_see_each_others_paths():
    """Two threads on one model, one without gradients (packed path), one with (dense path):
    every result equals the single-threaded one (no per-call state is switched)."""
    torch.manual_seed(0)
    lin = Linear(64, 48)
    xs = [torch.randn(8, 64) for _ in range(4)]
    with torch.no_grad():
        want = [lin(x) for x in xs]
    errors = []

    def infer():
        with torch.no_grad():
            for _ in range(30):
                for x, w in zip(xs, want):
                    if not torch.equal(lin(x), w):
                        errors.append("no-grad")

    def train():
        for _ in range(30):
            for x, w in zip(xs, want):
                y = lin(x)
                if not y.requires_grad or not torch.allclose(y, w, atol=1e-5, rtol=1e-5):
                    errors.append("grad")

    threads = [threading.Thread(target=infer), threading.Thread(target=train)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- no module replaces another's forward -----------------------------------------------------------

def test_no_forward_assignment_in_qru_sources():
    root = Path(__file__).resolve().parents[1] / "qru"
    pattern = re.compile(r"\.forward\s*=(?!=)|setattr\([^)]*['\"]forward['\"]|__dict__\[['\"]forward['\"]\]\s*=")
    hits = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# -- fused projections: linear_group and qru.model.linear.fused_linears ---------------------------

@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_group_equals_the_layers_one_by_one(dtype, bias):
    """One GEMM on the packed concatenation equals the separate products (fp64 oracle; bf16: the
    bf16 rounding of it), the slot holds the same bytes as the three single copies would."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 32, generator=g).to(dtype)
    ws = [torch.randn(n, 32, generator=g).to(dtype) for n in (16, 8, 8)]
    bs = [torch.randn(n, generator=g).to(dtype) if bias else None for n in (16, 8, 8)]
    slot, held = KL.PackedWeight(), KL.packed_bytes()
    with torch.no_grad():
        y = KL.linear_group(x, ws, bs, slot)
        assert y is not None and y.shape == (2, 6, 32) and slot.packed
        assert KL.packed_bytes() == held + 32 * 32 * ws[0].element_size()
        want = torch.cat([_ref64(x, w, b) for w, b in zip(ws, bs)], -1)
        if dtype == torch.float32:
            _close(y, want, 32)
        else:
            torch.testing.assert_close(y.double(), want, atol=0.1, rtol=0.02)
            one = torch.cat([KL.linear(x, w, b) for w, b in zip(ws, bs)], -1)
            torch.testing.assert_close(y, one, atol=0.05, rtol=0.02)
        packed = slot.get(ws)
        assert KL.linear_group(x, ws, bs, slot) is not None and slot.get(ws) is packed  # cached
        ws[1].mul_(2)  # an in-place update of one weight: repacked
        _close(KL.linear_group(x, ws, bs, slot).float(),
               torch.cat([_ref64(x, w, b) for w, b in zip(ws, bs)], -1), 32 if dtype == torch.float32 else 4e5)


@needs_onednn
def test_linear_group_declines_where_the_packed_path_would(monkeypatch):
    x, w, b = _data(M=6, K=24, N=10)
    ws, bs = [w, w.clone()], [b, b.clone()]
    slot = KL.PackedWeight()
    assert KL.linear_group(x, ws, bs, slot) is not None  # fp32, nothing needs a gradient: packed, as linear()
    assert KL.choose(x, w, b, KL.PackedWeight()) == "packed"
    ws_g = [w.clone().requires_grad_(), w.clone()]
    assert KL.linear_group(x, ws_g, bs, slot) is None and not slot.packed  # a weight needs its gradient
    with torch.no_grad():
        assert KL.linear_group(x[:1], ws, bs, slot) is None  # one row
        assert KL.linear_group(x, ws, [b, None], slot) is None  # a bias on some layers only
        assert KL.linear_group(x, [w, w.double()], bs, slot) is None  # mixed dtypes
        xb, wb = x.to(torch.bfloat16), [t.to(torch.bfloat16) for t in ws]
        assert KL.linear_group(xb[:4], wb, [None, None], slot) is None  # bf16 at <= 4 rows: the skinny kernel
        assert KL.linear_group(xb, wb, [None, None], slot) is not None and slot.packed
        monkeypatch.setenv("QRU_PACKED_BF16", "torch")  # the calibration keeps the default path
        assert KL.linear_group(xb, wb, [None, None], slot) is None
        monkeypatch.setenv("QRU_PACKED_BF16", "onednn")
        monkeypatch.setenv("QRU_BACKEND", "torch")
        assert KL.linear_group(xb, wb, [None, None], slot) is None and not slot.packed


@needs_onednn
def test_fused_linears_in_the_model_equal_the_unfused_forward(monkeypatch):
    """A bf16 Llama in no-grad CPU inference runs q/k/v and gate/up as one packed GEMM each; the
    logits and the KV cache equal those of the unfused path (packing off) within bf16 round-off;
    the layers' own slots stay empty (no second copy); a transformed or hooked projection, global
    module hooks, or gradients, take the layers one by one."""
    from qru.model.config import LlamaConfig
    from qru.model.linear import fused_linears
    from qru.model.llama import Llama

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Llama(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        cache = model.new_cache(3, 8)
        fused = model(ids, cache=cache).float()
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn.qkv_packed.packed and mlp.gate_up_packed.packed
        assert not any(m.packed_weight.packed for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj))
        monkeypatch.setenv("QRU_PACKED_BF16", "torch")
        cache2 = model.new_cache(3, 8)
        plain = model(ids, cache=cache2).float()
    torch.testing.assert_close(fused, plain, atol=0.03, rtol=0.03)
    for a, b in zip(cache.keys + cache.values, cache2.keys + cache2.values):
        torch.testing.assert_close(a.float(), b.float(), atol=0.03, rtol=0.03)
    monkeypatch.setenv("QRU_PACKED_BF16", "onednn")
    x = torch.randn(3, 7, 32).to(torch.bfloat16)
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.no_grad():
        assert fused_linears(layers, x, attn.qkv_packed) is not None
        set_weight_transform(attn.k_proj, lambda m, w: w * 1)
        assert fused_linears(layers, x, attn.qkv_packed) is None and not attn.qkv_packed.packed
        set_weight_transform(attn.k_proj, None)
    assert fused_linears(layers, x, attn.qkv_packed) is None  # grad mode: bf16 takes no packed path
    # a forward hook on a projection (or a global one) sees its own call: the layers run one by one
    seen = []
    with torch.no_grad():
        h = attn.v_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert fused_linears(layers, x, attn.qkv_packed) is None
        model(ids)
        h.remove()
        g = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
        try:
            assert fused_linears(layers, x, attn.qkv_packed) is None
        finally:
            g.remove()
        assert fused_linears(layers, x, attn.qkv_packed) is not None
    assert seen == [(3, 7, 16)]

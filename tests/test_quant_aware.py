"""qru.train.quant_aware: export targets and skip rules, fake-quantized parameters for functional_call,
code_flip_frac on hand-computed tensors, and the model-side seam (the layers' weight transform): the
quantized forward of a whole Llama bit-equal to the model with quantize->dequantize weights, its STE
gradient against finite differences of the unrounded path (float64), the model untouched outside."""
import copy

import pytest
import torch
from torch import nn

from qru.kernels.fake_quant import fake_quant, fake_quant_lora, fake_quant_lora_reference, fake_quant_values
from qru.model.config import LlamaConfig
from qru.model.linear import Linear
from qru.model.llama import Llama
from qru.model.lora import apply_lora
from qru.model.lora_linear import LoRALinear
from qru.quant import dequantize, quantize
from qru.train import quant_aware as qa


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].q_proj = Linear(64, 1, bias=False)
        self.lm_head = Linear(64, 1, bias=False)

    def forward(self, x):
        return self.lm_head(x) + self.layers[0].q_proj(x)


def base_row():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1], w[0, 2], w[0, 3] = 1.0, 0.0, 0.5, 0.2
    return w


def model_with(w):
    m = Tiny()
    with torch.no_grad():
        m.layers[0].q_proj.weight.copy_(w)
        m.lm_head.weight.zero_()
    return m


def test_targets_follow_the_export_skip_rules():
    m = Tiny()
    assert [n for n, _ in qa.quant_targets(m)] == ["layers.0.q_proj"]
    assert [n for n, _ in qa.quant_targets(m, skip="")] == ["layers.0.q_proj", "lm_head"]
    assert [n for n, _ in qa.quant_targets(m, skip=("q_proj", "lm_head"))] == []


def test_code_flip_frac_hand_computed_full_mode():
    m = model_with(base_row())
    base = qa.snapshot(m)
    assert qa.code_flip_frac(base, m, "nf4,int8") == {"nf4": 0.0, "int8": 0.0}
    with torch.no_grad():
        w = m.layers[0].q_proj.weight
        w[0, 1] = 0.05   # nf4 (absmax 1): code of 0.0 -> of 0.0796 (0.05 > midpoint 0.0398); int8: 0 -> 6
        w[0, 2] = 0.51   # nf4: 0.4407 -> 0.5626 (midpoint 0.5017); int8: round(63.5) = 64 -> round(64.77) = 65
        w[0, 3] = 0.201  # nf4: stays 0.1609 (below 0.2035); int8: round(25.4) = 25 -> round(25.527) = 26
        m.lm_head.weight.fill_(1.0)  # skipped at export: not counted
    assert qa.code_flip_frac(base, m, ["nf4", "int8"]) == {"nf4": 2 / 64, "int8": 3 / 64}


def test_code_flip_frac_hand_computed_lora_mode():
    m = model_with(base_row())
    m.layers[0].q_proj = LoRALinear.from_linear(m.layers[0].q_proj, r=1, alpha=1)
    lo = m.layers[0].q_proj
    with torch.no_grad():
        lo.lora_B.zero_()
    base = qa.snapshot(m)  # B = 0: the frozen base
    assert torch.equal(base["layers.0.q_proj"], base_row())
    with torch.no_grad():
        lo.lora_A.zero_()
        lo.lora_A[0, 1] = 0.05
        lo.lora_B.fill_(1.0)  # s = alpha / r = 1: W_eff[0, 1] = 0.05
    assert qa.code_flip_frac(base, m, "nf4,int8") == {"nf4": 1 / 64, "int8": 1 / 64}
    with pytest.raises(ValueError, match="snapshot lacks 'layers.0.q_proj'"):
        qa.code_flip_frac({}, m, "nf4")


def test_fake_quant_params_full_mode_functional_call():
    torch.manual_seed(0)
    m = model_with(torch.randn(1, 64) * 0.1)
    params = qa.fake_quant_params(m, "int4")
    assert list(params) == ["layers.0.q_proj.weight"]
    wq = params["layers.0.q_proj.weight"]
    assert torch.equal(wq, fake_quant(m.layers[0].q_proj.weight, "int4", 128))
    x = torch.randn(3, 64)
    y = torch.func.functional_call(m, params, (x,))
    assert torch.equal(y, m.lm_head(x) + x @ wq.t())
    y.sum().backward()  # STE: d/dW of sum(x W_qᵀ) = column sums of x
    assert torch.allclose(m.layers[0].q_proj.weight.grad, x.sum(0, keepdim=True))


def test_fake_quant_params_lora_mode_functional_call():
    torch.manual_seed(1)
    m = model_with(torch.randn(1, 64) * 0.1)
    m.layers[0].q_proj = LoRALinear.from_linear(m.layers[0].q_proj, r=2, alpha=4)
    lo = m.layers[0].q_proj
    with torch.no_grad():
        lo.lora_B.normal_()
    params = qa.fake_quant_params(m, "q4_0")
    wq = params["layers.0.q_proj.weight"]
    assert torch.equal(wq, fake_quant_lora(lo.weight, lo.lora_A, lo.lora_B, lo.scaling, "q4_0"))
    x = torch.randn(3, 64)
    qa.attach(m)
    try:
        with qa.fake_quantized(m, "q4_0"):  # the layer's weight transform: linear(x, W_q)
            y = m(x)
    finally:
        qa.detach(m)
    assert "forward" not in lo.__dict__ and lo.weight_transform is None
    assert torch.allclose(y, m.lm_head(x) + x @ wq.t())
    y.sum().backward()
    G = x.sum(0, keepdim=True)  # dL/dW_q
    assert torch.allclose(lo.lora_A.grad, lo.scaling * lo.lora_B.detach().t() @ G)
    assert torch.allclose(lo.lora_B.grad, lo.scaling * G @ lo.lora_A.detach().t())


def test_parse_formats_names_the_bad_one():
    assert qa.parse_formats("nf4, int4,nf4") == ["nf4", "int4"]
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        qa.parse_formats("nf4,int3")
    with pytest.raises(ValueError, match="at least one format"):
        qa.parse_formats("")


# -- the model-side seam on a whole Llama ----------------------------------------------------------

def tiny_llama(seed=0, **over):
    torch.manual_seed(seed)
    cfg = LlamaConfig.preset("tiny", num_hidden_layers=1, vocab_size=96, **over)
    m = Llama(cfg)
    m.init_weights(seed)
    return m


def tiny_lora_llama(seed=0):
    """tiny_llama with rank-2 adapters whose B is non-zero (so the adapter changes the weights)."""
    m = tiny_llama(seed)
    apply_lora(m, r=2, alpha=4, seed=0)
    with torch.no_grad():
        for _, mod in qa.quant_targets(m):
            mod.lora_B.normal_(0, 0.05)
    return m


def test_attach_leaves_the_model_untouched_outside_the_quantized_pass():
    m = tiny_llama()
    params = {n: id(p) for n, p in m.named_parameters()}
    keys = list(m.state_dict())
    names = qa.attach(m)
    assert names == [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n != "lm_head"]
    with pytest.raises(ValueError, match="already attached"):
        qa.attach(m)
    targets = [m.get_submodule(n) for n in names]
    assert all(t.weight_transform is None for t in targets)
    with qa.fake_quantized(m, "nf4"):
        assert all(t.weight_transform is not None for t in targets) and m.lm_head.weight_transform is None
    assert all(t.weight_transform is None for t in targets)
    with pytest.raises(RuntimeError, match="boom"):
        with qa.fake_quantized(m, "int8"):
            raise RuntimeError("boom")
    assert all(t.weight_transform is None for t in targets)  # cleared on error too
    qa.detach(m)
    assert list(m.state_dict()) == keys and {n: id(p) for n, p in m.named_parameters()} == params
    with pytest.raises(ValueError, match="needs an attached model"):
        with qa.fake_quantized(m, "nf4"):
            pass
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="0 is a Linear, not a qru Linear"):
        qa.attach(plain, skip=())


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8", "q4_0"])
def test_full_mode_quantized_forward_bit_equal_to_dequantized_model(fmt):
    """Oracle: a copy of the model whose targets hold dequantize(quantize(W)), run plainly."""
    m = tiny_llama(1)
    oracle = copy.deepcopy(m)
    bs = 32 if fmt == "int4" else None  # a non-default group, passed through as `qru quantize --block-size`
    with torch.no_grad():
        for name, mod in qa.quant_targets(oracle):
            mod.weight.copy_(dequantize(quantize(mod.weight, fmt, bs)))
    x = torch.randint(0, 96, (2, 11))
    with qa.attached(m):
        plain = m(x)
        with qa.fake_quantized(m, fmt, bs):
            yq = m(x)
        again = m(x)  # the context restored the full-precision pass
    assert torch.equal(yq, oracle(x))
    assert torch.equal(plain, again) and not torch.equal(plain, yq)
    assert torch.equal(m.lm_head.weight, oracle.lm_head.weight)  # skipped at export, as `qru quantize`


def test_lora_mode_quantized_forward_bit_equal_to_merged_fake_quant():
    m = tiny_lora_llama(2)
    oracle = copy.deepcopy(m)
    targets = dict(qa.quant_targets(oracle))
    with torch.no_grad():
        for name, mod in targets.items():  # the materialised merge, fake-quantized: a plain linear
            lin = nn.Linear(mod.in_features, mod.out_features, bias=False)
            lin.weight.copy_(fake_quant_lora_reference(mod.weight, mod.lora_A, mod.lora_B, mod.scaling, "nf4"))
            parent, _, leaf = name.rpartition(".")
            setattr(oracle.get_submodule(parent), leaf, lin)
    x = torch.randint(0, 96, (2, 9))
    with qa.attached(m):
        with qa.fake_quantized(m, "nf4"):
            yq = m(x)
    assert torch.equal(yq, oracle(x))


def test_skip_and_applicability_name_the_culprit():
    m = tiny_llama()
    assert [n for n, _ in qa.check_applicable(m, ["nf4"], skip="mlp,lm_head")] == [
        f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    odd = tiny_llama(intermediate_size=175)
    with pytest.raises(ValueError, match=r"int4: cannot apply to model\.layers\.0\.mlp\.down_proj\.weight"):
        qa.check_applicable(odd, ["nf4", "int4"])  # int4 packs pairs along a row of odd width 175
    assert len(qa.check_applicable(odd, ["nf4", "int4"], skip="down_proj,lm_head")) == 6
    with pytest.raises(ValueError, match="block size 64 does not fit q4_0"):
        qa.check_applicable(m, ["q4_0"], block_size=64)
    with pytest.raises(ValueError, match="no linear to quantize"):
        qa.check_applicable(m, ["nf4"], skip="layers,lm_head")
    with torch.device("meta"):  # shapes only: validation before any weight is loaded
        meta = Llama(LlamaConfig.preset("tiny"))
    assert len(qa.check_applicable(meta, ["nf4", "q8_0"])) == 14


def _ce(logits, y):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_full_mode_ste_gradient_matches_finite_differences_of_unrounded_path():
    """Through the whole model: the STE gradient of L(model with D(Q(W))) w.r.t. a target W equals
    the derivative of the unrounded path h(W) = L(model with W + R), R = D(Q(W)) - W frozen, by
    central differences in float64."""
    m = tiny_llama(3)
    x, y = torch.randint(0, 96, (2, 7)), torch.randint(0, 96, (2, 7))
    with qa.attached(m):
        with qa.fake_quantized(m, "nf4"):
            _ce(m(x), y).backward()
    m64 = copy.deepcopy(m).double()
    name = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        for n, mod in qa.quant_targets(m64):
            w32 = m.get_submodule(n).weight
            mod.weight.copy_(fake_quant_values(w32, "nf4").double())  # = W + R exactly
    w = m64.get_submodule(name).weight
    r = fake_quant_values(m.get_submodule(name).weight, "nf4").double() - m.get_submodule(name).weight.double()
    assert (r != 0).any()
    grad = m.get_submodule(name).weight.grad
    eps = 1e-3  # the fused norm / rope kernels keep fp32 internals: smaller steps drown in their round-off
    for idx in [(0, 0), (5, 100), (40, 7), (63, 175)]:
        with torch.no_grad():
            w0 = w[idx].item()
            w[idx] = w0 + eps
            lp = _ce(m64(x), y).item()
            w[idx] = w0 - eps
            lm = _ce(m64(x), y).item()
            w[idx] = w0
        fd = (lp - lm) / (2 * eps)
        assert abs(grad[idx].item() - fd) <= 5e-3 * abs(fd) + 1e-6, (idx, grad[idx].item(), fd)
    plain = copy.deepcopy(m)
    plain.zero_grad()
    _ce(plain(x), y).backward()  # the gradient at the unrounded weights differs: the check is not trivial
    assert not torch.allclose(plain.get_submodule(name).weight.grad, grad, rtol=1e-2, atol=1e-5)


def test_lora_mode_ste_gradient_matches_finite_differences_of_unrounded_path():
    m = tiny_lora_llama(4)
    x, y = torch.randint(0, 96, (2, 7)), torch.randint(0, 96, (2, 7))
    with qa.attached(m):
        with qa.fake_quantized(m, "int4_sym", 32):
            _ce(m(x), y).backward()
    name = "model.layers.0.self_attn.v_proj"
    lo = m.get_submodule(name)
    # float64 oracle: plain linears holding W + s·B·A + R, with R frozen and A, B free
    m64 = copy.deepcopy(m).double()
    resid = {}
    with torch.no_grad():
        for n, mod in qa.quant_targets(m):
            merged = mod.weight.double() + mod.scaling * mod.lora_B.double() @ mod.lora_A.double()
            resid[n] = fake_quant_values(mod.weight, "int4_sym", 32, lora=(mod.lora_A, mod.lora_B, mod.scaling)
                                         ).double() - merged
    lo64 = m64.get_submodule(name)

    def h():
        with torch.no_grad():
            for n, mod in qa.quant_targets(m64):
                mod.weight.copy_(m.get_submodule(n).weight.double() + resid[n])
            # the LoRA path adds s·B·A to W + R: exactly W + s·B·A + R
            return _ce(m64(x), y).item()

    assert (resid[name] != 0).any()
    eps = 1e-3
    for tensor, grad, idx in [(lo64.lora_A, lo.lora_A.grad, (0, 3)), (lo64.lora_A, lo.lora_A.grad, (1, 50)),
                              (lo64.lora_B, lo.lora_B.grad, (10, 0)), (lo64.lora_B, lo.lora_B.grad, (31, 1))]:
        with torch.no_grad():
            t0 = tensor[idx].item()
            tensor[idx] = t0 + eps
        lp = h()
        with torch.no_grad():
            tensor[idx] = t0 - eps
        lm = h()
        with torch.no_grad():
            tensor[idx] = t0
        fd = (lp - lm) / (2 * eps)
        assert abs(grad[idx].item() - fd) <= 5e-3 * abs(fd) + 1e-6, (idx, grad[idx].item(), fd)


# -- the margin (--qa-margin) ---------------------------------------------------------------------


@pytest.mark.parametrize("grad", ["exact", "ste"])
def test_margin_loss_hand_computed_value_and_gradient(grad):
    fp = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    q = torch.tensor([1.5, 1.9, 2.0], requires_grad=True)
    h = qa.margin_loss(fp, q, 0.2, grad)  # relu(-0.3), relu(0.3), relu(1.2) -> mean 0.5
    assert h.item() == pytest.approx(0.5, abs=1e-6)
    h.backward()
    assert torch.allclose(fp.grad, torch.tensor([0.0, 1 / 3, 1 / 3]))
    if grad == "ste":
        assert torch.allclose(q.grad, torch.tensor([0.0, -1 / 3, -1 / 3]))
    else:  # the quantized side is detached: the a.e. derivative of a piecewise-constant path
        assert q.grad is None
    with pytest.raises(ValueError, match="nll_fp \\(3,\\) and nll_q \\(2,\\) differ"):
        qa.margin_loss(fp, q[:2], 0.2)
    with pytest.raises(ValueError, match="--qa-margin-grad must be one of"):
        qa.margin_loss(fp, q, 0.2, "sam")


def _seq_step(m, x, y):
    """A toy step: per-row 'NLL' (x_i·w - y_i)², loss = -mean (gradient ascent)."""
    def step_fn(fb, rb):
        nll = (m(x)[:, 0] - y) ** 2
        return {"loss": -nll.mean(), "forget_loss": -nll.mean(), "retain_loss": None, "forget_seq_nll": nll,
                "row_share": 1.0}
    return step_fn


@pytest.mark.parametrize("mgrad", ["exact", "ste"])
def test_margin_step_gradient_matches_finite_differences(mgrad):
    """The wrapped step with --qa-margin: its gradient w.r.t. the target W equals, by central
    differences in float64 (some rows active, some not), the derivative of h(w) = L(w) + λ·L(w + R) +
    γ·mean relu(nll(w) - nll_q + m), R = D(Q(W)) - W frozen, with nll_q = nll(w + R) ("ste") or
    held at its value at W ("exact": the rounding's a.e. derivative is zero)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 64, generator=g) * 0.1
    x, y = torch.randn(6, 64, generator=g), torch.randn(6, generator=g)
    m = model_with(w)
    lam, gam, mar = 3.0, 5.0, 0.01
    with qa.attached(m):
        step = qa.quant_aware_step(_seq_step(m, x, y), m, ["nf4"], lam, margin=mar, margin_weight=gam,
                                   margin_grad=mgrad)
        out = step(None, None)
        out["loss"].backward()
    grad = m.layers[0].q_proj.weight.grad.double()[0]
    w64 = w.double()[0]
    r = fake_quant_values(w, "nf4").double()[0] - w64
    x64, y64 = x.double(), y.double()

    nq0 = (x64 @ (w64 + r) - y64) ** 2

    def h(v):
        nf, nq = (x64 @ v - y64) ** 2, (x64 @ (v + r) - y64) ** 2
        return -nf.mean() - lam * nq.mean() + gam * torch.relu(nf - (nq if mgrad == "ste" else nq0) + mar).mean()

    act = ((x64 @ w64 - y64) ** 2 - (x64 @ (w64 + r) - y64) ** 2 + mar) > 0
    assert act.any() and not act.all()  # both branches of the hinge are exercised
    assert out["loss"].item() == pytest.approx(float(h(w64)), rel=1e-5)
    assert float(out["qa_margin"]) == pytest.approx(float(h(w64) - (-((x64 @ w64 - y64) ** 2).mean()
                                                                     - lam * ((x64 @ (w64 + r) - y64) ** 2).mean())) / gam,
                                                   rel=1e-4)
    eps = 1e-6
    fd = torch.stack([(h(w64 + eps * e) - h(w64 - eps * e)) / (2 * eps) for e in torch.eye(64, dtype=torch.float64)])
    assert torch.allclose(grad, fd, rtol=1e-3, atol=1e-5), (grad - fd).abs().max()
    # without the margin the gradient differs: the check is not trivial
    m2 = model_with(w)
    with qa.attached(m2):
        qa.quant_aware_step(_seq_step(m2, x, y), m2, ["nf4"], lam)(None, None)["loss"].backward()
    assert not torch.allclose(m2.layers[0].q_proj.weight.grad, grad.float(), atol=1e-4)


def test_margin_off_or_inactive_changes_nothing():
    """Off (margin None): no margin keys, the loss is L(fp) + λ·L(q). Inactive (every row's quantized
    NLL already above its full-precision one, margin 0): loss and gradient bit-equal to off, even
    at weight 100."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 64, generator=g) * 0.1
    x, y = torch.randn(6, 64, generator=g), torch.randn(6, generator=g)
    nf = (x @ w[0] - y) ** 2
    nq = (x @ fake_quant_values(w, "nf4")[0] - y) ** 2
    keep = nq > nf
    assert keep.any() and not keep.all()
    xs, ys = x[keep], y[keep]

    def run(**kw):
        m = model_with(w)
        with qa.attached(m):
            out = qa.quant_aware_step(_seq_step(m, xs, ys), m, ["nf4"], 2.0, **kw)(None, None)
            out["loss"].backward()
        return out, m.layers[0].q_proj.weight.grad.clone()

    off, g_off = run()
    assert "qa_margin" not in off and "qa_gap" not in off
    assert off["loss"].item() == pytest.approx(float(-nf[keep].mean() - 2.0 * nq[keep].mean()), rel=1e-6)
    inactive, g_inactive = run(margin=0.0, margin_weight=100.0)
    assert float(inactive["qa_margin"]) == 0.0 and float(inactive["qa_gap"]) > 0
    assert torch.equal(off["loss"], inactive["loss"]) and torch.equal(g_off, g_inactive)


def test_margin_options_are_checked():
    m = model_with(base_row())
    with pytest.raises(ValueError, match="--qa-margin must be a finite number >= 0"):
        qa.quant_aware_step(lambda f, r: {}, m, ["nf4"], margin=-0.1)
    with pytest.raises(ValueError, match="--qa-margin-weight must be a finite number >= 0"):
        qa.quant_aware_step(lambda f, r: {}, m, ["nf4"], margin=0.1, margin_weight=float("nan"))
    with pytest.raises(ValueError, match="--qa-margin-grad must be one of"):
        qa.quant_aware_step(lambda f, r: {}, m, ["nf4"], margin=0.1, margin_grad="sam")
    with qa.attached(m):
        step = qa.quant_aware_step(lambda f, r: {"loss": torch.zeros(())}, m, ["nf4"], margin=0.1)
        with pytest.raises(ValueError, match="returns no 'forget_seq_nll'"):
            step(None, None)

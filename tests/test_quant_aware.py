"""qru.train.quant_aware: export targets and skip rules, fake-quantized parameters for functional_call,
and code_flip_frac on hand-computed tensors."""
import pytest
import torch
from torch import nn

from qru.kernels.fake_quant import fake_quant, fake_quant_lora
from qru.model.linear import set_weight_transform
from qru.model.lora import LoRALinear
from qru.train import quant_aware as qa


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].q_proj = nn.Linear(64, 1, bias=False)
        self.lm_head = nn.Linear(64, 1, bias=False)

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
    # the LoRA kernel refuses a base weight that carries a gradient, so the quantized forward gives
    # the targets a weight transform (the layer's own seam): the layer then runs linear(x, W_q)
    wq_of = {id(mod): w for _, mod, w in qa.fake_quant_targets(m, "q4_0")}
    set_weight_transform(lo, lambda mod, _w: wq_of[id(mod)])
    y = m(x)
    set_weight_transform(lo, None)
    assert "forward" not in lo.__dict__
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

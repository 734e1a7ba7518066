"""LoRALinear, apply_lora, merging and PEFT-format adapters, checked against peft and transformers."""
import json
import math

import pytest
import torch
from torch import nn

from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.model import lora as L

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_pair(seed=0, **overrides):
    """qru Llama and transformers' LlamaForCausalLM holding the same weights."""
    torch.manual_seed(seed)
    cfg = LlamaConfig.preset("tiny", **overrides)
    q = Llama(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_dict()))
    hf.load_state_dict(q.state_dict())
    return q, hf


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in L.lora_modules(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def peft_lora_weights(pm):
    """module name -> (A, B) from a peft model (adapter 'default')."""
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name] = (mod.lora_A["default"].weight, mod.lora_B["default"].weight)
    return out


def ids_batch(seed=3, shape=(2, 11)):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# LoRALinear
# ----------------------------------------------------------------------------------------
def test_lora_linear_init_and_scale():
    lin = nn.Linear(40, 24)
    m = L.LoRALinear.from_linear(lin, 8, 16, generator=torch.Generator().manual_seed(0))
    assert m.weight is lin.weight and m.bias is lin.bias  # shared, not copied
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.shape == (8, 40) and m.lora_B.shape == (24, 8)
    bound = 1 / math.sqrt(40)  # kaiming_uniform_(a=sqrt(5)): gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.8 * bound
    assert torch.count_nonzero(m.lora_B) == 0
    assert m.scaling == 2.0
    assert L.LoRALinear.from_linear(lin, 16, 8, use_rslora=True).scaling == pytest.approx(8 / 4)
    x = torch.randn(3, 5, 40)
    assert torch.allclose(m(x), lin(x), atol=1e-6)  # B = 0: the base output


def test_lora_linear_given_init_and_errors():
    lin = nn.Linear(12, 10, bias=False)
    A, B = torch.randn(4, 12), torch.randn(10, 4)
    m = L.LoRALinear.from_linear(lin, 4, 4, init=(A, B))
    assert torch.equal(m.lora_A, A) and torch.equal(m.lora_B, B)
    with pytest.raises(ValueError, match="lora_A"):
        L.LoRALinear.from_linear(lin, 4, 4, init=(torch.randn(3, 12), B))
    with pytest.raises(ValueError, match="rank"):
        L.LoRALinear.from_linear(lin, 0, 4)
    with pytest.raises(ValueError, match="init"):
        L.LoRALinear.from_linear(lin, 4, 4, init="orthogonal")
    # half-precision base: fp32 adapters, as peft's autocast_adapter_dtype
    m16 = L.LoRALinear.from_linear(nn.Linear(12, 10).to(torch.bfloat16), 4, 4)
    assert m16.lora_A.dtype == torch.float32


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_peft_layer(bias):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(24, 20, bias=bias))
    pm = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], lora_dropout=0.1))
    pl = pm.base_model.model.proj
    nn.init.normal_(pl.lora_B["default"].weight)
    ours = L.LoRALinear.from_linear(nn.Linear(24, 20, bias=bias), 3, 5, dropout=0.1,
                                    init=(pl.lora_A["default"].weight.detach(), pl.lora_B["default"].weight.detach()))
    with torch.no_grad():
        ours.weight.copy_(pl.base_layer.weight)
        if bias:
            ours.bias.copy_(pl.base_layer.bias)
    ours.eval()
    pm.eval()
    x = torch.randn(7, 24, requires_grad=True)
    y_ref = pl(x)
    y = ours(x)
    assert torch.allclose(y, y_ref, atol=1e-6)
    gy = torch.randn_like(y)
    g_ref = torch.autograd.grad(y_ref, (x, pl.lora_A["default"].weight, pl.lora_B["default"].weight), gy)
    g = torch.autograd.grad(y, (x, ours.lora_A, ours.lora_B), gy)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-5)


class _FixedDropout(nn.Module):
    """peft's lora_dropout replaced by a fixed keep-mask, so the drop pattern is shared."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.keep = mask, 1 / (1 - p)

    def forward(self, x):
        return x * self.mask.to(x.dtype) * self.keep


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_linear_matches_peft_under_bf16_autocast(dropout, nf4):
    """fp32 base and adapters under CPU bf16 autocast: qru's LoRALinear (its fused op) against
    peft's LoRA Linear under the same autocast, output and x/A/B gradients (bf16 tolerance).
    NF4: peft gets the dequantized base, qru the packed one."""
    torch.manual_seed(0)
    n_in, n_out, r, p = 64, 48, 4, dropout
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(n_in, n_out, bias=True))
    if nf4:
        from qru.quant.formats import quantize
        q = quantize(base.proj.weight.detach(), "nf4")
        with torch.no_grad():
            base.proj.weight.copy_(q.dequantize(torch.float32))
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=8, target_modules=["proj"], lora_dropout=p))
    pl = pm.base_model.model.proj
    nn.init.normal_(pl.lora_B["default"].weight)
    init = (pl.lora_A["default"].weight.detach(), pl.lora_B["default"].weight.detach())
    if nf4:
        ours = L.LoRALinear.from_nf4(q, r, 8, bias=pl.base_layer.bias.detach(), compute_dtype=torch.float32,
                                     dropout=p, init=init)
    else:
        ours = L.LoRALinear.from_linear(nn.Linear(n_in, n_out), r, 8, dropout=p, init=init)
        with torch.no_grad():
            ours.weight.copy_(pl.base_layer.weight)
            ours.bias.copy_(pl.base_layer.bias)
    x = torch.randn(2, 9, n_in)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) >= p
    pl.lora_dropout["default"] = _FixedDropout(mask, p) if p else nn.Identity()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = pl(xs[0])
        y = L.lora_linear(xs[1], ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, dropout_p=p,
                          dropout_mask=mask if p else None, nf4=ours.qtensor())
    assert y.dtype == y_ref.dtype == torch.bfloat16
    gy = torch.randn(y.shape)
    g_ref = torch.autograd.grad(y_ref, (xs[0], pl.lora_A["default"].weight, pl.lora_B["default"].weight), gy)
    g = torch.autograd.grad(y, (xs[1], ours.lora_A, ours.lora_B), gy)

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    assert rel(y, y_ref) < 1.6e-2
    for name, a, b in zip(("dX", "dA", "dB"), g, g_ref):
        assert a.dtype == torch.float32, name
        assert rel(a, b) < 1.6e-2, f"{name}: {rel(a, b):.2e}"
    if not p:  # the module's own forward, eval mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ours.eval()(x), y.detach())


def test_dropout_only_in_training():
    m = L.LoRALinear.from_linear(nn.Linear(32, 16), 4, 8, dropout=0.5)
    nn.init.normal_(m.lora_B)
    x = torch.randn(6, 32)
    m.eval()
    y_eval = m(x)
    ref = torch.nn.functional.linear(x, m.weight, m.bias) + m.scaling * (x @ m.lora_A.t()) @ m.lora_B.t()
    assert torch.allclose(y_eval, ref, atol=1e-5)
    m.train()
    assert not torch.allclose(m(x), y_eval, atol=1e-4)
    # the base path never sees dropout
    with L.disable_adapters(m):
        assert torch.allclose(m(x), torch.nn.functional.linear(x, m.weight, m.bias), atol=1e-6)


def test_disable_adapters_restores_flags():
    q, _ = tiny_pair()
    L.apply_lora(q, r=4, alpha=8)
    randomize_lora(q)
    mods = [m for _, m in L.lora_modules(q)]
    mods[0].disabled = True  # a flag set by hand survives the context
    ids = ids_batch()
    with torch.no_grad():
        with L.disable_adapters(q):
            assert all(m.disabled for m in mods)
            off = q(ids)
        assert mods[0].disabled and not any(m.disabled for m in mods[1:])
        mods[0].disabled = False
        on = q(ids)
    _, hf = tiny_pair()
    with torch.no_grad():
        assert torch.allclose(off, hf(ids).logits, atol=1e-5)
    assert not torch.allclose(on, off, atol=1e-3)


def test_nf4_lora_linear():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from test_lora_kernels import nf4_qtensor

    W = torch.randn(20, 24)
    qd, st = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
    m = L.LoRALinear.from_nf4(nf4_qtensor(qd, st.absmax, (20, 24)), 4, 8, compute_dtype=torch.float32,
                              bias=torch.randn(20))
    nn.init.normal_(m.lora_B)
    deq = bnbF.dequantize_4bit(qd, st)
    x = torch.randn(5, 24)
    ref = torch.nn.functional.linear(x, deq, m.bias) + m.scaling * (x @ m.lora_A.t()) @ m.lora_B.t()
    assert torch.allclose(m(x), ref, atol=1e-5)
    assert torch.allclose(m.merged_weight(), deq + m.scaling * m.lora_B @ m.lora_A, atol=1e-6)
    # one packed-weight type and one name: the buffers QuantLinear uses
    assert {"qweight", "scales", "lora_A", "lora_B", "bias"} == set(m.state_dict())
    assert torch.equal(m.qtensor().dequantize(torch.float32), deq)


def test_nf4_lora_state_dict_of_older_versions_loads():
    """A QLoRA module's state dict saved under the older buffer names (weight_nf4, weight_absmax,
    weight_code) loads into today's module and gives the same output; a non-NF4 codebook is refused."""
    from qru.kernels import quant4
    from qru.quant import quantize

    W = torch.randn(20, 24)
    src = L.LoRALinear.from_nf4(quantize(W, "nf4"), 4, 8, bias=torch.randn(20))
    nn.init.normal_(src.lora_B)
    old = {"weight_nf4": src.qweight.clone(), "weight_absmax": src.scales.clone(),
           "weight_code": torch.tensor(quant4.NF4_CODE), "lora_A": src.lora_A.detach().clone(),
           "lora_B": src.lora_B.detach().clone(), "bias": src.bias.detach().clone()}
    dst = L.LoRALinear.from_nf4(quantize(torch.zeros(20, 24), "nf4"), 4, 8, bias=torch.zeros(20))
    dst.load_state_dict(old)
    x = torch.randn(3, 24)
    assert torch.equal(dst(x), src(x)) and torch.equal(dst.qweight, src.qweight)
    old["weight_code"] = torch.linspace(-1, 1, 16)
    with pytest.raises(ValueError, match="weight_code is not the standard NF4 codebook"):
        dst.load_state_dict(old)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_lora_linear_from_qru_qtensor(double_quant):
    formats = pytest.importorskip("qru.quant.formats")
    W = torch.randn(21, 37)  # odd element count: partial last block, padded nibble
    qt = formats.quantize(W, "nf4", 64, double_quant=double_quant)
    m = L.LoRALinear.from_nf4(qt, 3, 6)
    assert m.compute_dtype == torch.float32
    nn.init.normal_(m.lora_B)
    deq = qt.dequantize(torch.float32)
    x = torch.randn(2, 4, 37, requires_grad=True)
    y = m(x)
    ref = torch.nn.functional.linear(x, deq) + m.scaling * (x @ m.lora_A.t()) @ m.lora_B.t()
    assert torch.allclose(y, ref, atol=1e-5)
    gx, gA = torch.autograd.grad(y.sum(), (x, m.lora_A))
    rx, rA = torch.autograd.grad(ref.sum(), (x, m.lora_A))
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gA, rA, atol=1e-5)
    with pytest.raises(TypeError, match="needs a 2-D nf4 QTensor.*got a fp4 QTensor"):
        L.LoRALinear.from_nf4(formats.quantize(W, "fp4", 64), 3, 6)


# ----------------------------------------------------------------------------------------
# apply_lora
# ----------------------------------------------------------------------------------------
def test_apply_lora_swaps_freezes_and_counts_like_peft():
    q, hf = tiny_pair()
    base_sd = {k: v for k, v in q.state_dict().items()}
    stats = L.apply_lora(q, r=4, alpha=8)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(L.TARGETS)))
    assert (stats.trainable, stats.total) == pm.get_nb_trainable_parameters()
    assert stats.modules == 7 * q.config.num_hidden_layers
    assert "trainable params" in str(stats)
    sd = q.state_dict()
    for k, v in base_sd.items():  # base keys unchanged, same storage
        assert k in sd and sd[k].data_ptr() == v.data_ptr()
    assert {k for k in sd if "lora" in k} == {f"{n}.{w}" for n, _ in L.lora_modules(q) for w in ("lora_A", "lora_B")}
    trainable = {n for n, p in q.named_parameters() if p.requires_grad}
    assert trainable == {n for n in sd if n.endswith(("lora_A", "lora_B"))}


def test_apply_lora_errors():
    q, _ = tiny_pair()
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        L.apply_lora(q, targets=["nope_proj"])
    L.apply_lora(q, targets=["q_proj"], r=2)
    with pytest.raises(ValueError, match="already"):
        L.apply_lora(q)


def test_only_adapters_get_gradients():
    q, _ = tiny_pair()
    L.apply_lora(q, r=4, alpha=8)
    randomize_lora(q)
    q(ids_batch()).float().logsumexp(-1).mean().backward()
    for n, p in q.named_parameters():
        assert (p.grad is not None) == n.endswith(("lora_A", "lora_B")), n


# ----------------------------------------------------------------------------------------
# Parity with peft on a tiny model
# ----------------------------------------------------------------------------------------
def test_logits_and_adapter_grads_match_peft(tmp_path):
    q, hf = tiny_pair()
    L.apply_lora(q, r=4, alpha=8)
    randomize_lora(q)
    L.save_adapter(q, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path, is_trainable=True)
    ids = ids_batch()
    labels = ids_batch(seed=4)
    logits_q = q(ids)
    logits_p = pm(input_ids=ids).logits
    assert torch.allclose(logits_q, logits_p, atol=1e-5)
    loss_q = nn.functional.cross_entropy(logits_q.flatten(0, 1), labels.flatten())
    loss_p = nn.functional.cross_entropy(logits_p.flatten(0, 1), labels.flatten())
    loss_q.backward()
    loss_p.backward()
    pw = peft_lora_weights(pm)
    mods = dict(L.lora_modules(q))
    assert set(pw) == set(mods)
    for name, (A, B) in pw.items():
        assert torch.allclose(mods[name].lora_A.grad, A.grad, atol=1e-6, rtol=1e-4), name
        assert torch.allclose(mods[name].lora_B.grad, B.grad, atol=1e-6, rtol=1e-4), name


def test_round_trip_qru_peft_qru(tmp_path):
    q, hf = tiny_pair()
    L.apply_lora(q, targets=["q_proj", "v_proj", "down_proj"], r=3, alpha=6, dropout=0.05, use_rslora=True)
    randomize_lora(q)
    q.save_pretrained(tmp_path / "base")  # a local base path: peft looks for its config.json
    L.save_adapter(q, tmp_path / "a", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "a" / L.CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 6 and cfg["use_rslora"] is True
    assert cfg["fan_in_fan_out"] is False and cfg["base_model_name_or_path"] == str(tmp_path / "base")
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "a").iterdir())

    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a")
    pm.eval()
    q.eval()
    ids = ids_batch()
    with torch.no_grad():
        assert torch.allclose(q(ids), pm(input_ids=ids).logits, atol=1e-5)
    pm.save_pretrained(tmp_path / "b")

    q2, _ = tiny_pair()
    L.load_adapter(q2, tmp_path / "b")
    q2.eval()
    m1, m2 = dict(L.lora_modules(q)), dict(L.lora_modules(q2))
    assert set(m1) == set(m2)
    for n in m1:
        assert torch.equal(m1[n].lora_A, m2[n].lora_A) and torch.equal(m1[n].lora_B, m2[n].lora_B)
        assert m2[n].scaling == m1[n].scaling and m2[n].lora_dropout == 0.05
    with torch.no_grad():
        assert torch.equal(q(ids), q2(ids))


def test_peft_adapter_with_patterns_loads(tmp_path):
    _, hf = tiny_pair()
    pm = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
        rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 3}, init_lora_weights="gaussian"))
    for _, (A, B) in peft_lora_weights(pm).items():
        nn.init.normal_(B, std=0.3)
    pm.eval()
    pm.save_pretrained(tmp_path)
    q, _ = tiny_pair()
    L.load_adapter(q, tmp_path)
    mods = dict(L.lora_modules(q))
    assert mods["model.layers.0.self_attn.k_proj"].r == 2
    assert mods["model.layers.1.mlp.up_proj"].scaling == pytest.approx(3 / 4)
    ids = ids_batch()
    with torch.no_grad():
        assert torch.allclose(q(ids), pm(input_ids=ids).logits, atol=1e-5)
    # and back: the config written by qru carries the patterns
    L.save_adapter(q, tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / L.CONFIG_NAME).read_text())
    assert cfg["rank_pattern"] == {f"model.layers.{i}.self_attn.k_proj": 2 for i in range(2)}
    _, hf2 = tiny_pair()
    pm2 = peft.PeftModel.from_pretrained(hf2, tmp_path / "again")
    with torch.no_grad():
        assert torch.allclose(q(ids), pm2(input_ids=ids).logits, atol=1e-5)


def test_partial_layer_targets_use_exact_regex(tmp_path):
    q, hf = tiny_pair()
    L.apply_lora(q, targets=r"model\.layers\.1\.self_attn\.(q|v)_proj", r=2, alpha=2)
    randomize_lora(q)
    L.save_adapter(q, tmp_path)
    cfg = json.loads((tmp_path / L.CONFIG_NAME).read_text())
    assert isinstance(cfg["target_modules"], str)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path)
    assert set(peft_lora_weights(pm)) == {n for n, _ in L.lora_modules(q)}
    ids = ids_batch()
    with torch.no_grad():
        assert torch.allclose(q(ids), pm(input_ids=ids).logits, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_is_exact(dtype):
    q, _ = tiny_pair()
    q.to(dtype)
    L.apply_lora(q, r=5, alpha=7)
    randomize_lora(q)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    merged = L.merge_lora(q)
    assert not any("lora" in k for k in merged)
    assert list(merged) == [k for k in before if "lora" not in k]
    for k, v in q.state_dict().items():  # the model is untouched
        assert torch.equal(v, before[k])
    for name, m in L.lora_modules(q):
        exact = m.weight.double() + m.scaling * (m.lora_B.double() @ m.lora_A.double())
        got = merged[f"{name}.weight"]
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert torch.allclose(got.double(), exact, rtol=0, atol=4 * torch.finfo(torch.float32).eps * exact.abs().max().item())
        else:  # fp32 math then one rounding: at most one bf16 ulp from the fp64 value rounded
            ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-30)
            assert ((got.double() - exact.to(dtype).double()).abs() <= ulp).all()


def test_merged_model_logits_equal_adapter_model(tmp_path):
    q, _ = tiny_pair()
    L.apply_lora(q, r=4, alpha=8)
    randomize_lora(q)
    q.eval()
    ids = ids_batch()
    merged = L.merge_lora(q)
    fresh = Llama(q.config)
    fresh.load_state_dict(merged)
    with torch.no_grad():
        assert torch.allclose(fresh(ids), q(ids), atol=2e-5)
        expect = q(ids)
        L.merge_and_unload(q)
        assert not list(L.lora_modules(q))
        assert torch.allclose(q(ids), expect, atol=2e-5)


def test_merge_state_dict_raw_and_per_shard(tmp_path):
    q, _ = tiny_pair()
    L.apply_lora(q, r=4, alpha=8, use_rslora=True)
    randomize_lora(q)
    L.save_adapter(q, tmp_path)
    cfg, ad = L.read_adapter(tmp_path)
    merged_model = L.merge_lora(q)
    base = {k: v for k, v in merged_model.items()}
    for name, m in L.lora_modules(q):
        base[f"{name}.weight"] = m.weight.detach()
    full = L.merge_state_dict(base, ad, cfg)
    for k in merged_model:
        assert torch.equal(full[k], merged_model[k]), k
    # shard by shard: only layer 1's tensors, strict=False skips the others
    shard = {k: v for k, v in base.items() if k.startswith("model.layers.1.")}
    part = L.merge_state_dict(shard, ad, cfg, strict=False)
    assert set(part) == set(shard)
    for k in part:
        assert torch.equal(part[k], merged_model[k])
    with pytest.raises(L.AdapterError, match=r"base state dict has no .model\.layers\.0\."):
        L.merge_state_dict(shard, ad, cfg)
    # the helpers the pipeline uses
    km = L.map_adapter_keys(ad)
    assert km["model.layers.0.mlp.up_proj.weight"] == (
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")
    assert L.adapter_scales(ad, cfg)["model.layers.0.mlp.up_proj.weight"] == pytest.approx(8 / 2)
    assert L.parse_peft_key("base_model.model.x.q_proj.lora_B.default.weight") == ("x.q_proj", "lora_B")
    W, A, B = torch.randn(6, 5, dtype=torch.float16), torch.randn(2, 5), torch.randn(6, 2)
    got = L.merge_weight(W, A, B, 0.5)
    assert got.dtype == torch.float16
    assert torch.equal(got, (W.float() + 0.5 * B @ A).half())


# ----------------------------------------------------------------------------------------
# Bad adapters
# ----------------------------------------------------------------------------------------
def test_adapter_shape_mismatch_names_the_key(tmp_path):
    q, _ = tiny_pair()
    L.apply_lora(q, r=4, alpha=8)
    L.save_adapter(q, tmp_path)
    other, _ = tiny_pair(intermediate_size=96)
    with pytest.raises(L.AdapterError, match=r"mlp\.(gate|up|down)_proj\.lora_[AB]\.weight"):
        L.load_adapter(other, tmp_path)
    # a model that already has LoRA of another rank
    r8, _ = tiny_pair()
    L.apply_lora(r8, r=8, alpha=8)
    with pytest.raises(L.AdapterError, match=r"lora_A\.weight' has shape \(4, \d+\), the model's"):
        L.load_adapter(r8, tmp_path)


def test_bad_adapter_files(tmp_path):
    q, _ = tiny_pair()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        L.load_adapter(q, tmp_path)
    L.apply_lora(q, r=2, alpha=2)
    L.save_adapter(q, tmp_path)
    cfg = json.loads((tmp_path / L.CONFIG_NAME).read_text())
    (tmp_path / L.CONFIG_NAME).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    fresh, _ = tiny_pair()
    with pytest.raises(L.AdapterError, match="peft_type"):
        L.load_adapter(fresh, tmp_path)
    (tmp_path / L.CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(L.AdapterError, match="use_dora"):
        L.load_adapter(fresh, tmp_path)
    (tmp_path / L.CONFIG_NAME).write_text("{not json")
    with pytest.raises(L.AdapterError, match="malformed"):
        L.load_adapter(fresh, tmp_path)
    (tmp_path / L.CONFIG_NAME).write_text(json.dumps(cfg))
    (tmp_path / L.WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        L.load_adapter(fresh, tmp_path)
    with pytest.raises(L.AdapterError, match="no lora_B"):
        L.map_adapter_keys(["base_model.model.m.q_proj.lora_A.weight"])
    with pytest.raises(L.AdapterError, match="embed_tokens"):
        L.parse_peft_key("base_model.model.model.embed_tokens.weight")


def test_adapter_for_missing_module(tmp_path):
    from safetensors.torch import save_file

    q, _ = tiny_pair()
    L.apply_lora(q, r=2, alpha=2)
    L.save_adapter(q, tmp_path)
    sd = dict(L.adapter_state_dict(q))
    sd["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 64)
    sd["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 2)
    save_file(sd, str(tmp_path / L.WEIGHTS_NAME))
    fresh, _ = tiny_pair()
    with pytest.raises(L.AdapterError, match="layers.7"):
        L.load_adapter(fresh, tmp_path)

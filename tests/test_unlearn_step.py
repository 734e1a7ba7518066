"""The unlearning step function (qru.train.unlearn.make_unlearn_step) and model_sequence_logprobs:
the fused-head path equals the logits path; a per-batch NPO reference (LoRA: adapters disabled,
full: a frozen copy) equals the precomputed table; errors."""
import copy

import pytest
import torch

from qru.model import lora
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.train import losses as L
from qru.train.data import Batch
from qru.train.config import TrainConfigError
from qru.train.loop import model_sequence_logprobs
from qru.train.unlearn import make_unlearn_step


def tiny(seed=0):
    torch.manual_seed(seed)
    m = Llama(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    m.init_weights(seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(10)
    return m


def batches(seed=1, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(2):
        ids = torch.randint(0, 97, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :3] = 0  # a prompt
        mask[1, 9:] = 0  # right padding
        out.append(Batch(ids, mask, mask.clone(), torch.arange(k * B, (k + 1) * B)))
    return out


def logits_path(model, ids, mask):
    return L.sequence_logprobs(model(ids), ids, mask)


@pytest.mark.parametrize("grad", [False, True])
def test_model_sequence_logprobs_fused_equals_logits(grad):
    m = tiny()
    fb, _ = batches()
    with torch.set_grad_enabled(grad):
        s, n = model_sequence_logprobs(m, fb.input_ids, fb.loss_mask)
        rs, rn = logits_path(m, fb.input_ids, fb.loss_mask)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)
    assert torch.equal(n, rn)
    if grad:
        gs = torch.autograd.grad(s.sum(), m.model.layers[0].mlp.up_proj.weight)[0]
        gr = torch.autograd.grad(rs.sum(), m.model.layers[0].mlp.up_proj.weight)[0]
        torch.testing.assert_close(gs, gr, rtol=1e-4, atol=1e-5)


def test_model_sequence_logprobs_autocast_bf16():
    m = tiny()
    fb, _ = batches()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        s, _ = model_sequence_logprobs(m, fb.input_ids, fb.loss_mask)
        rs, _ = logits_path(m, fb.input_ids, fb.loss_mask)
    torch.testing.assert_close(s, rs, rtol=1e-3, atol=1e-2)


def test_model_sequence_logprobs_other_models_use_logits():
    """A model that is not qru's Llama (here: one with a LoRA'd lm_head) goes through its logits."""
    m = tiny()
    lora.apply_lora(m, targets=["lm_head"], r=2, alpha=4, seed=0)
    fb, _ = batches()
    with torch.no_grad():
        s, _ = model_sequence_logprobs(m, fb.input_ids, fb.loss_mask)
        rs, _ = logits_path(m, fb.input_ids, fb.loss_mask)
    assert torch.equal(s, rs)


def run(step_fn, fb, rb, params):
    for p in params:
        p.grad = None
    out = step_fn(fb, rb)
    out["loss"].backward()
    return float(out["loss"].detach()), [p.grad.clone() for p in params]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_online_reference_equals_table(mode):
    m = tiny()
    fb, rb = batches()
    with torch.no_grad():
        table = torch.zeros(6)
        table[fb.index] = logits_path(m, fb.input_ids, fb.loss_mask)[0]
    if mode == "lora":
        lora.apply_lora(m, r=4, alpha=8, seed=0)
        with torch.no_grad():
            for _, mod in lora.lora_modules(m):
                mod.lora_B.normal_(0, 0.05)  # the policy differs from the reference
        ref_model, ref_ctx = m, (lambda: lora.disable_adapters(m))
    else:
        ref_model, ref_ctx = copy.deepcopy(m).eval(), None
        for p in ref_model.parameters():
            p.requires_grad_(False)
        for p in m.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            m.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    params = [p for p in m.parameters() if p.requires_grad]
    kw = dict(method="npo", reg="gdr", beta=0.1)
    online = make_unlearn_step(m, ref_model=ref_model, **kw, **({"ref_ctx": ref_ctx} if ref_ctx else {}))
    tabled = make_unlearn_step(m, ref_logp=table, **kw)
    la, ga = run(online, fb, rb, params)
    lb, gb = run(tabled, fb, rb, params)
    assert abs(la - lb) < 1e-4 * max(1, abs(la))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and the NPO term is not trivially at its theta = ref value
    assert abs(float(online(fb, rb)["forget_loss"].detach()) - 2 / 0.1 * 0.6931471805599453) > 1e-3


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_step_replaces_no_forward_and_takes_the_fused_head(mode, monkeypatch):
    """An unlearning step (NPO with an online reference, GDR, backward, AdamW) on qru's Llama: no
    module's forward is an instance attribute at any call (a pre-hook on every module checks it,
    so a swap restored afterwards is caught too) or afterwards, and the logprobs take the fused
    head (the model's own Linear lm_head)."""
    m = tiny()
    fused = []
    real = L.hidden_sequence_logprobs
    monkeypatch.setattr(L, "hidden_sequence_logprobs", lambda *a, **k: fused.append(1) or real(*a, **k))
    if mode == "lora":
        lora.apply_lora(m, r=4, alpha=8, seed=0)
        ref_model, ref_ctx = m, (lambda: lora.disable_adapters(m))
    else:
        ref_model, ref_ctx = copy.deepcopy(m).eval(), None
    swapped = []
    models = [m] if ref_model is m else [m, ref_model]
    for mm in models:
        for mod in mm.modules():
            mod.register_forward_pre_hook(lambda mod, a: swapped.append(mod) if "forward" in mod.__dict__ else None)
    step = make_unlearn_step(m, method="npo", reg="gdr", beta=0.1, ref_model=ref_model,
                             **({"ref_ctx": ref_ctx} if ref_ctx else {}))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    fb, rb = batches()
    for _ in range(2):
        step(fb, rb)["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert swapped == [] and fused
    assert all("forward" not in mod.__dict__ for mm in models for mod in mm.modules())


def test_step_matches_hand_written_losses():
    m = tiny()
    fb, rb = batches()
    table = torch.randn(6)
    step = make_unlearn_step(m, method="npo", reg="gdr", beta=0.3, ref_logp=table, forget_weight=0.7,
                             retain_weight=2.0)
    out = step(fb, rb)
    s, _ = logits_path(m, fb.input_ids, fb.loss_mask)
    f = -(2 / 0.3) * torch.nn.functional.logsigmoid(-0.3 * (s - table[fb.index])).mean()
    rs, rn = logits_path(m, rb.input_ids, rb.loss_mask)
    r = -rs.sum() / rn.sum()
    torch.testing.assert_close(out["loss"], 0.7 * f + 2.0 * r, rtol=1e-5, atol=1e-4)
    # the per-sequence forget NLL (the quant-aware margin's input), with its graph
    n = fb.loss_mask[:, 1:].sum(1).float()
    torch.testing.assert_close(out["forget_seq_nll"], -s / n, rtol=1e-5, atol=1e-4)
    assert out["forget_seq_nll"].requires_grad and out["row_share"] == fb.row_share


def test_errors():
    m = tiny()
    with pytest.raises(TrainConfigError, match="ref_logp"):
        make_unlearn_step(m, method="npo", reg="gdr", beta=0.1)
    with pytest.raises(TrainConfigError, match="klr"):
        make_unlearn_step(m, method="ga", reg="klr", beta=0.1)
    with pytest.raises(TrainConfigError, match="method"):
        make_unlearn_step(m, method="dpo", reg="gdr", beta=0.1)


def test_make_optimizer_is_adamw():
    """The loop's optimizer (fused AdamW where available) takes the same steps as torch's default AdamW."""
    from qru.train.loop import make_optimizer

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa = make_optimizer(a, 1e-2, 0.1)
    ob = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    assert oa.defaults["fused"]
    for k in range(4):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, generator=torch.Generator().manual_seed(k))
            pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)

"""Issue 16 items 2 / 2b: the confounds of the full fine-tuning arm and "say when nothing happened".

``--train linears`` trains exactly what 4-bit export quantizes; ``--quantize-head``; pure bf16
(bf16 weights and AdamW state, no fp32 master; the second-moment decay lost to rounding, by hand);
``--lr-relative`` (each group's lr = X * std(W), by hand); the logged update size ||dW||/||W||
(recomputed from the saved checkpoints) and the stall warning.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_loop import _qru, _ucfg, target, tofu_slice  # noqa: F401  (fixtures)

from qru.eval.precision import build_model, eval_at_precisions
from qru.model.llama import Llama
from qru.quant.qlinear import QuantLinear, quantize_model
from qru.train.config import STALL_THRESHOLD, TrainConfigError
from qru.train.loop import make_optimizer
from qru.train.state import latest_checkpoint, read_metrics, work_dir
from qru.train.unlearn import unlearn

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized_by_export(model_dir):
    m = Llama.from_pretrained(model_dir)
    quantize_model(m, "nf4")  # default skip, the code path of qru quantize / eval
    return {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}


def test_train_linears_trains_exactly_the_quantized_matrices(tofu_slice, target, tmp_path):
    res = unlearn(_ucfg(tofu_slice, target, tmp_path / "u", method="ga", reg="gdr", mode="full", lr=7e-4,
                          epochs=1, train="linears"))
    trained = {n for n, p in res.model.named_parameters() if p.requires_grad}
    assert trained == _quantized_by_export(target.out)
    assert len(trained) == 7 * 2  # seven linears x two layers; no embed / norm / lm_head
    before = Llama.from_pretrained(target.out).state_dict()
    after = Llama.from_pretrained(res.out).state_dict()
    for k in before:
        if k in trained:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k  # frozen: bit-identical
    run = json.loads((res.out / "run.json").read_text())
    assert run["train"] == "linears" and set(run["trained_tensors"]) == trained


def test_quantize_head(target, tmp_path):
    m = build_model(target.out, "nf4", quantize_head=True)
    assert isinstance(m.lm_head, QuantLinear)
    assert not isinstance(build_model(target.out, "nf4").lm_head, QuantLinear)
    recs = eval_at_precisions(target.out, None, "bf16,nf4", lambda model, p: {}, quantize_head=True)
    assert [r["head_quantized"] for r in recs] == [False, True]
    # a tied head cannot be quantized separately: clear errors, in memory and in qru quantize
    tied = tmp_path / "tied"
    tied.mkdir()
    cfg = json.loads((target.out / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    sd = load_file(str(target.out / "model.safetensors"))
    from safetensors.torch import save_file
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, str(tied / "model.safetensors"))
    with pytest.raises(ValueError, match="tie_word_embeddings.*cannot be quantized separately"):
        build_model(tied, "nf4", quantize_head=True)
    r = _qru("quantize", str(tied), "--format", "nf4", "--quantize-head", "--out", str(tmp_path / "q"))
    assert r.returncode == 2 and "cannot be quantized separately" in r.stderr
    r = _qru("quantize", str(target.out), "--format", "nf4", "--quantize-head", "--out", str(tmp_path / "q2"))
    assert r.returncode == 0, r.stderr
    qc = json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in json.dumps(qc)  # not in the skipped modules: quantized
    idx = json.loads((tmp_path / "q2" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight.absmax" in idx and "model.layers.0.mlp.up_proj.weight.absmax" in idx


def test_adamw_bf16_state_by_hand():
    """Pure bf16: the fused AdamW keeps bf16 state; the x0.999 decay of exp_avg_sq rounds away, and a
    step below half an ulp of the weight changes nothing (no fp32 master accumulates it)."""
    assert torch.tensor(0.999).to(torch.bfloat16).item() == 1.0  # the decay of v = 1.0 is lost
    res = {}
    for dt in (torch.bfloat16, torch.float32):
        p = torch.nn.Parameter(torch.ones(4, dtype=dt))
        opt = make_optimizer([p], 1e-3, 0.0)
        assert opt.defaults["fused"]
        g = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=dt)
        p.grad = g.clone()
        opt.step()
        st = opt.state[p]
        assert st["exp_avg"].dtype == dt and st["exp_avg_sq"].dtype == dt
        v1 = st["exp_avg_sq"].clone()
        m1 = st["exp_avg"].clone()
        for _ in range(5):
            p.grad = torch.zeros_like(p)
            opt.step()
        res[dt] = (p.detach().clone(), v1, st["exp_avg_sq"].clone(), m1, st["exp_avg"].clone())
    w, v1, v6, m1, m6 = res[torch.bfloat16]
    # hand values: v1 = 0.001 g^2 rounded to bf16; m1 = 0.1 g rounded
    assert torch.equal(v1, (0.001 * torch.tensor([1.0, 4.0, 9.0, 0.25])).to(torch.bfloat16))
    assert torch.equal(v6, v1)  # five decays of x0.999, all rounded away
    assert (m6.float() < 0.6 * m1.float()).all()  # exp_avg (x0.9 per step) does decay: 0.9^5 = 0.59
    # each step moves w = 1.0 by about lr = 1e-3 < half an ulp at 1.0 (2^-8): the weight never changes
    assert torch.equal(w, torch.ones(4, dtype=torch.bfloat16))
    wf, v1f, v6f, _, _ = res[torch.float32]
    torch.testing.assert_close(v6f, v1f * 0.999 ** 5, rtol=1e-6, atol=0)  # fp32: the decay happens
    assert (wf < 1.0 - 2e-3).all()  # fp32: the steps (1e-3, then shrinking with exp_avg) accumulate


def test_master_bf16_is_pure_bf16(tofu_slice, target, tmp_path):
    out = tmp_path / "u"
    res = unlearn(_ucfg(tofu_slice, target, out, method="ga", reg="gdr", mode="full", lr=7e-4, epochs=2,
                          train="linears", master_dtype="bf16", precision="bf16", stop_after=1))
    assert res.status == "stopped"
    assert all(p.dtype == torch.bfloat16 for p in res.model.parameters())
    ckpt = latest_checkpoint(work_dir(out))
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    tensors = [t for st in opt["state"].values() for k, t in st.items() if k != "step"]
    assert len(opt["state"]) == 14 and tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors)  # exp_avg, exp_avg_sq: bf16, no fp32 master
    assert {k for st in opt["state"].values() for k in st} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(ckpt / "trainable.safetensors")).values())


def test_lr_relative_groups_by_hand(tofu_slice, target, tmp_path):
    out = tmp_path / "u"
    X = 1e-3
    unlearn(_ucfg(tofu_slice, target, out, method="ga", reg="gdr", mode="full", train="linears", lr_relative=X,
                    epochs=2, stop_after=1))
    opt = torch.load(latest_checkpoint(work_dir(out)) / "optimizer.pt", weights_only=True)
    sd = load_file(str(target.out / "model.safetensors"))
    groups = opt["param_groups"]
    assert len(groups) == 14
    for g in groups:
        w = sd[g["name"]].double()
        std = math.sqrt(((w - w.mean()) ** 2).sum().item() / (w.numel() - 1))
        assert g["lr"] == pytest.approx(X * std, rel=1e-5), g["name"]
    with pytest.raises(TrainConfigError, match="lr_relative"):
        unlearn(_ucfg(tofu_slice, target, tmp_path / "l", mode="lora", lr_relative=X))


def _rel(a, b):
    return math.sqrt(sum(((x.double() - y.double()) ** 2).sum().item() for x, y in zip(a, b))) / \
        math.sqrt(sum((y.double() ** 2).sum().item() for y in b))


def test_update_size_logged_full_and_lora(tofu_slice, target, tmp_path):
    res = unlearn(_ucfg(tofu_slice, target, tmp_path / "f", method="ga", reg="gdr", mode="full", lr=7e-4,
                          epochs=1))
    rows = [r for r in read_metrics(res.out / "metrics.jsonl") if "update" in r]
    assert rows[0]["update"]["q_proj"] == 0.0 and rows[-1]["update"]["q_proj"] > 0
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed", "head",
            "norm"} == set(rows[-1]["update"])
    a, b = load_file(str(res.out / "model.safetensors")), load_file(str(target.out / "model.safetensors"))
    for t, key in (("q_proj", "self_attn.q_proj"), ("down_proj", "mlp.down_proj")):
        ks = [f"model.layers.{i}.{key}.weight" for i in range(2)]
        assert rows[-1]["update"][t] == pytest.approx(_rel([a[k] for k in ks], [b[k] for k in ks]), rel=1e-4)
    assert rows[-1]["update"]["head"] == pytest.approx(_rel([a["lm_head.weight"]], [b["lm_head.weight"]]), rel=1e-4)

    res = unlearn(_ucfg(tofu_slice, target, tmp_path / "l", method="ga", reg="gdr", mode="lora", lr=5e-3,
                          epochs=1, rank=4, alpha=8.0))
    up = [r for r in read_metrics(res.out / "metrics.jsonl") if "update" in r][-1]["update"]
    assert set(up) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ad = load_file(str(res.out / "adapter_model.safetensors"))
    deltas, bases = [], []
    for i in range(2):
        A = next(v for k, v in ad.items() if f"layers.{i}.mlp.up_proj.lora_A" in k)
        B = next(v for k, v in ad.items() if f"layers.{i}.mlp.up_proj.lora_B" in k)
        W = b[f"model.layers.{i}.mlp.up_proj.weight"]
        deltas.append(W.double() + 2.0 * (B.double() @ A.double()))
        bases.append(W)
    assert up["up_proj"] == pytest.approx(_rel(deltas, bases), rel=1e-4)


def test_stall_warning(tofu_slice, target, tmp_path):
    res = unlearn(_ucfg(tofu_slice, target, tmp_path / "s", method="ga", reg="gdr", mode="lora", lr=1e-9,
                          epochs=1))
    assert len(res.warnings) == 1 and "forget NLL moved only" in res.warnings[0]
    assert "learning rate" in res.warnings[0] and "epochs" in res.warnings[0]
    assert json.loads((res.out / "run.json").read_text())["warnings"] == res.warnings
    moved = unlearn(_ucfg(tofu_slice, target, tmp_path / "m", method="ga", reg="gdr", mode="full", lr=7e-4,
                            epochs=1))
    assert moved.evals[-1]["forget_nll"] - moved.evals[0]["forget_nll"] > STALL_THRESHOLD
    assert moved.warnings == []
    r = _qru("unlearn", "--model", str(target.out), "--forget", str(tofu_slice["forget"]), "--retain",
             str(tofu_slice["retain"]), "--method", "ga", "--mode", "full", "--train", "linears", "--lr", "1e-9",
             "--epochs", "1", "--batch-size", "8", "--max-len", "128", "--precision", "fp32", "--eval-samples",
             "8", "--no-progress", "--out", str(tmp_path / "cli"), "--cache-dir", str(tofu_slice["cache"]))
    assert r.returncode == 0, r.stderr
    assert "warning: forget NLL moved only" in r.stderr
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["config"]["train"] == "linears"


def test_demo_preset_knobs(tmp_path):
    from qru.demo import PresetError, get_preset

    with pytest.raises(PresetError, match="unlearn.train"):
        get_preset("mini", {"unlearn.train": "embeddings"})
    with pytest.raises(PresetError, match="pretrained"):
        get_preset("mini", {"pretrained.facts": "3"})
    cfg = get_preset("mini", {"unlearn.train": "linears", "eval.quantize_head": "true"})
    assert cfg.unlearn.train == "linears" and cfg.eval.quantize_head is True


@pytest.mark.slow
def test_demo_with_linears_and_quantized_head(tmp_path):
    from qru.demo import get_preset, run_demo

    cfg = get_preset("mini", {"unlearn.train": "linears", "eval.quantize_head": "true", "unlearn.modes": "full",
                              "unlearn.seeds": "1"})
    run = run_demo(cfg, tmp_path / "d", progress=False, report=False)
    assert {(r["precision"], r["head_quantized"]) for r in run.records} == {("bf16", False), ("nf4", True)}
    unl = next((tmp_path / "d" / "stages").glob("unlearn-*"))
    info = json.loads((unl / "run.json").read_text())
    assert info["train"] == "linears" and not any("embed" in n or "norm" in n for n in info["trained_tensors"])


def test_presets_train_the_linears_at_width_learning_rates():
    """quick / full / mini: full FT of the linears only, learning rates by the width rule (by hand)."""
    from qru.demo import get_preset
    from qru.demo.presets import width_lrs

    assert width_lrs(64) == (1.25e-4, 6.25e-4) and width_lrs(4096) == (1.56e-5, 7.81e-5)
    for name, hidden in (("quick", 64), ("full", 128), ("mini", 32)):
        cfg = get_preset(name)
        assert cfg.model.hidden == hidden and cfg.unlearn.train == "linears"
        assert cfg.unlearn.lr_full == pytest.approx(1e-3 / hidden ** 0.5, rel=5e-3)
        assert cfg.unlearn.lr_lora == pytest.approx(5e-3 / hidden ** 0.5, rel=5e-3)

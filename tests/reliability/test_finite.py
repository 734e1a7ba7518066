"""Finite or fail: training stops at the first NaN/Inf loss or gradient (naming the step and the
term, before the optimizer applies it, leaving earlier checkpoints and no finished output);
adapters and quantized exports are checked before they are written, naming the culprit."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qru.cli import main
from qru.model.checkpoint import CheckpointError, load_state_dict, save_state_dict
from qru.model.llama import Llama
from qru.model.lora import AdapterError, apply_lora, save_adapter
from qru.quant.export import quantize_checkpoint
from qru.train import losses as L
from qru.train.config import UnlearnConfig
from qru.train.loop import NonFiniteLossError, check_finite_grads
from qru.train.state import list_checkpoints, work_dir
from qru.train.unlearn import unlearn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("finite_data")
    lines = (shared_data / "tofu" / "forget01.json").read_text(encoding="utf-8").splitlines()
    (d / "forget.jsonl").write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")
    (d / "retain.jsonl").write_text("\n".join(lines[8:16]) + "\n", encoding="utf-8")
    return d


def _cfg(tiny_dir, data, out, **kw):
    base = dict(out=str(out), model=str(tiny_dir), forget=[str(data / "forget.jsonl")],
                retain=[str(data / "retain.jsonl")], method="simnpo", reg="gdr", mode="lora", rank=2,
                targets=["q_proj", "v_proj"], epochs=1, batch_size=2, max_len=128, precision="fp32", eval_samples=2,
                progress=False, cache_dir=str(data / "cache"), lr=1e-3)
    base.update(kw)
    return UnlearnConfig(**base)


def _cli(capsys, *args):
    rc = main(list(args))
    return rc, capsys.readouterr().err


def _checkpoints(out):
    """The complete checkpoints of the unfinished run of ``out`` (kept beside it for --resume)."""
    return [p.name for p in list_checkpoints(work_dir(out))]


def test_nan_delta_is_refused_before_work(tiny_dir, data, tmp_path, capsys):
    rc, err = _cli(capsys, "unlearn", "--model", str(tiny_dir), "--forget", str(data / "forget.jsonl"), "--retain",
                   str(data / "retain.jsonl"), "--method", "simnpo", "--delta", "nan", "--no-progress",
                   "--out", str(tmp_path / "o"))
    assert rc == 2 and "delta must be a finite number" in err and "Traceback" not in err


def test_overflowing_loss_stops_at_step_1_and_commits_nothing(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "o"
    rc, err = _cli(capsys, "unlearn", "--model", str(tiny_dir), "--forget", str(data / "forget.jsonl"), "--retain",
                   str(data / "retain.jsonl"), "--method", "ga", "--forget-weight", "1e39", "--precision", "fp32",
                   "--batch-size", "2", "--max-len", "128", "--eval-samples", "2", "--epochs", "1", "--no-progress",
                   "--cache-dir", str(data / "cache"), "--out", str(out))
    assert rc == 2, err
    line = [x for x in err.splitlines() if "error" in x]
    assert len(line) == 1 and "step 1" in line[0] and "loss = -inf" in line[0], err
    assert "forget_loss" not in line[0]  # the forget term itself is finite; the weighted sum overflows
    assert not out.exists()  # nothing committed
    assert json.loads((work_dir(out) / "run.json").read_text())["status"] == "failed"


def test_nan_forget_loss_midway_keeps_the_earlier_checkpoint(tiny_dir, data, tmp_path, monkeypatch):
    calls = []
    orig = L.simnpo

    def simnpo(*a, **k):
        calls.append(1)
        v = orig(*a, **k)
        return v * float("nan") if len(calls) == 3 else v

    monkeypatch.setattr(L, "simnpo", simnpo)
    out = tmp_path / "o"
    with pytest.raises(NonFiniteLossError, match=r"step 3: forget_loss = nan, loss = nan"):
        unlearn(_cfg(tiny_dir, data, out, save_every=1, epochs=2))
    assert len(calls) == 3
    assert _checkpoints(out) == ["checkpoint-1", "checkpoint-2"], "the checkpoints before step 3 must stay"
    assert not out.exists()


def test_nan_gradient_is_named_and_not_applied(tiny_dir, data, tmp_path, monkeypatch):
    orig = L.simnpo

    def simnpo(s, n, beta, delta):  # finite value, NaN gradient: d sqrt(u)/du = inf at u = 0, times 0
        return orig(s, n, beta, delta) + torch.sqrt((s * 0).sum().clamp(min=0))

    monkeypatch.setattr(L, "simnpo", simnpo)
    seen = {}
    orig_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen["stepped"] = True
        return orig_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    for clip in (1.0, 0.0):
        with pytest.raises(NonFiniteLossError, match=r"step 1: gradient of model\.layers\.0\.self_attn\.q_proj\.lora_"):
            unlearn(_cfg(tiny_dir, data, tmp_path / f"o{clip}", max_grad_norm=clip))
    assert "stepped" not in seen


def test_inf_weight_after_the_last_step_is_not_saved(tiny_dir, data, tmp_path, monkeypatch):
    orig_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = orig_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][-1].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "o"
    with pytest.raises(NonFiniteLossError, match=r"step 1: parameter model\.layers\.1\.self_attn\.v_proj\.lora_B "
                                                    r"has non-finite"):
        unlearn(_cfg(tiny_dir, data, out, batch_size=8))  # one step: the forward never sees the Inf
    assert not out.exists()  # nothing committed
    assert json.loads((work_dir(out) / "run.json").read_text())["status"] == "failed"


def test_grad_check_clips_exactly_like_clip_grad_norm():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((7, 5), (3,), (11, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    ref = [p.grad.clone() for p in params]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for rp, r in zip(ref_params, ref):
        rp.grad = r.clone()
    torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    check_finite_grads({id(p): f"p{i}" for i, p in enumerate(params)}, params, 0.5, 1)
    for p, rp in zip(params, ref_params):
        assert torch.equal(p.grad, rp.grad)
    params[1].grad[2] = float("inf")
    with pytest.raises(NonFiniteLossError, match="step 7: gradient of p1 has 1 non-finite"):
        check_finite_grads({id(p): f"p{i}" for i, p in enumerate(params)}, params, 0.5, 7)


def test_save_adapter_refuses_nan(tiny_dir, tmp_path):
    model = Llama.from_pretrained(tiny_dir)
    apply_lora(model, targets=["q_proj"], r=2, seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_A[0, 3] = float("inf")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors.*'base_model\.model\.model\.layers\.1\."
                                           r"self_attn\.q_proj\.lora_A\.weight' has 1 non-finite"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


@pytest.fixture
def nan_adapter(tiny_dir, tmp_path):
    model = Llama.from_pretrained(tiny_dir)
    apply_lora(model, targets=["v_proj"], r=2, seed=0)
    save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    sd = load_file(f)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    sd[key][1, 1] = float("nan")
    save_file(sd, f)
    return tmp_path / "a", key


def test_quantize_nan_adapter_blames_the_adapter(tiny_dir, nan_adapter, tmp_path, capsys):
    adapter, key = nan_adapter
    rc, err = _cli(capsys, "quantize", str(tiny_dir), "--adapter", str(adapter), "--format", "nf4", "--no-progress",
                   "--out", str(tmp_path / "q"))
    assert rc == 2 and str(adapter / "adapter_model.safetensors") in err and key in err, err
    assert str(tiny_dir) + ":" not in err and not (tmp_path / "q").exists()


def test_quantize_nan_base_names_the_shard_and_tensor(tiny_dir, tmp_path):
    sd = {k: v.clone() for k, v in load_state_dict(tiny_dir).items()}
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    bad = tmp_path / "bad"
    save_state_dict(sd, bad, extra_files={"config.json": (tiny_dir / "config.json").read_text()})
    with pytest.raises(CheckpointError, match=r"bad/model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj"
                                              r"\.weight' has 1 non-finite"):
        quantize_checkpoint(bad, tmp_path / "q", "int8")


@pytest.mark.parametrize("fmt,skip,culprit", [("int8", "lm_head", "model.embed_tokens.weight"),
                                               ("nf4", "", "model.layers.0.mlp.down_proj.weight")])
def test_quantize_fp16_overflow_is_refused(tiny_dir, tmp_path, capsys, fmt, skip, culprit):
    sd = {k: v.clone() for k, v in load_state_dict(tiny_dir).items()}
    big = torch.finfo(torch.float16).max * 2  # finite in fp32, Inf once cast to fp16
    sd[culprit][5, 7] = big
    src = tmp_path / "big"
    save_state_dict(sd, src, extra_files={"config.json": (tiny_dir / "config.json").read_text()})
    rc, err = _cli(capsys, "quantize", str(src), "--format", fmt, "--skip", skip, "--compute-dtype", "fp16",
                   "--no-progress", "--out", str(tmp_path / "q"))
    assert rc == 2 and repr(culprit) in err and "float16" in err and "--compute-dtype bf16 or fp32" in err, err
    assert not (tmp_path / "q").exists()
    # bf16 has fp32's range: the same checkpoint exports
    rc, err = _cli(capsys, "quantize", str(src), "--format", fmt, "--skip", skip, "--compute-dtype", "bf16",
                   "--no-progress", "--out", str(tmp_path / "q"))
    assert rc == 0, err

"""qru.train (unlearn, pretrain, the loop, checkpoints) on a tiny model pre-trained on a TOFU slice: unlearning effect (GA/NPO + GDR, full and
LoRA), bit-identical resume (stop_after and Ctrl-C), trainable-parameter counts, metrics, CLI, errors.

Stated bound for the tiny-model runs: after 2 epochs of unlearning the forget NLL rises by at least
FORGET_RISE nats while the retain NLL ends at most RETAIN_BOUND nats above its starting value.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from qru.model.llama import Llama
from qru.model.tokenizer import Tokenizer
from qru.train import loop
from qru.train.config import PretrainConfig, TrainConfigError, UnlearnConfig
from qru.train.data import DataError, format_qa
from qru.train.loop import autocast
from qru.train.pretrain import pretrain
from qru.train.state import COMPLETE, METRICS, latest_checkpoint, list_checkpoints, read_metrics, work_dir
from qru.train.unlearn import unlearn

FORGET_RISE = 0.25
RETAIN_BOUND = 0.5
N_RETAIN = 80
LR = {("ga", "full"): 7e-4, ("npo", "full"): 7e-4, ("ga", "lora"): 5e-3, ("npo", "lora"): 4e-3}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tofu_slice(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("tofu_slice")
    forget = shared_data / "tofu" / "forget01.json"
    lines = (shared_data / "tofu" / "retain90.json").read_text(encoding="utf-8").splitlines()[:N_RETAIN]
    retain = d / "retain.jsonl"
    retain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"forget": forget, "retain": retain, "cache": d / "cache"}


@pytest.fixture(scope="session")
def target(tofu_slice, tmp_path_factory):
    """A tiny Llama (preset "tiny", 1024-piece tokenizer trained on the slice) fitted to forget + retain."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = pretrain(PretrainConfig(
            out=str(tmp_path_factory.mktemp("target")), data=[str(tofu_slice["forget"]), str(tofu_slice["retain"])],
            config="tiny", train_tokenizer=1024, epochs=15, lr=1e-2, batch_size=8, warmup_steps=5, max_len=128,
            precision="fp32", eval_samples=16, progress=False, cache_dir=str(tofu_slice["cache"])))
    finally:
        torch.set_num_threads(n)
    return res


def _ucfg(tofu_slice, target, out, **kw):
    base = dict(out=str(out), model=str(target.out), forget=[str(tofu_slice["forget"])],
                retain=[str(tofu_slice["retain"])], epochs=2, batch_size=8, max_len=128, precision="fp32",
                eval_samples=16, progress=False, cache_dir=str(tofu_slice["cache"]))
    base.update(kw)
    return UnlearnConfig(**base)


# -- pre-training ---------------------------------------------------------------------------

def test_pretrain_output_is_a_loadable_checkpoint(target):
    out = target.out
    assert target.status == "done"
    for f in ("config.json", "model.safetensors", "tokenizer.model", "run.json", "metrics.jsonl"):
        assert (out / f).is_file(), f
    assert not list(out.glob("checkpoint-*")) and not work_dir(out).exists()
    tok = Tokenizer.from_dir(out)
    model = Llama.from_pretrained(out)
    assert model.config.vocab_size == tok.vocab_size
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    nll = [r["train_nll"] for r in target.evals]
    assert len(nll) == 16 and nll[-1] < 0.5 * nll[0]  # it learned the slice
    sd = model.state_dict()
    for n, p in target.model.state_dict().items():
        assert torch.equal(sd[n], p), n
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "pretrain" and run["config"]["train_tokenizer"] == 1024 and "torch" in run["versions"]


def test_pretrain_init_finetune_bf16_master(target, tofu_slice, tmp_path):
    res = pretrain(PretrainConfig(out=str(tmp_path / "ft"), data=[str(tofu_slice["forget"])], init=str(target.out),
                                      epochs=1, lr=1e-3, batch_size=8, max_len=128, master_dtype="bf16",
                                      eval_samples=8, progress=False, cache_dir=str(tofu_slice["cache"])))
    assert all(p.dtype == torch.bfloat16 for p in res.model.parameters())
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert (tmp_path / "ft" / "tokenizer.model").read_bytes() == (target.out / "tokenizer.model").read_bytes()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.metrics[1:])


# -- unlearning effect ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("method", ["ga", "npo"])
def test_unlearning_raises_forget_nll_and_bounds_retain(tofu_slice, target, tmp_path, method, mode):
    res = unlearn(_ucfg(tofu_slice, target, tmp_path / "u", method=method, reg="gdr", mode=mode,
                          lr=LR[method, mode]))
    assert res.status == "done" and res.steps == res.total_steps == 10
    ev = res.evals
    assert [r["step"] for r in ev] == [0, 5, 10]
    f0, f1 = ev[0]["forget_nll"], ev[-1]["forget_nll"]
    r0, r1 = ev[0]["retain_nll"], ev[-1]["retain_nll"]
    assert all(r["forget_nll"] > 0 and r["retain_nll"] > 0 for r in ev)
    assert f1 >= f0 + FORGET_RISE, (f0, f1)
    assert r1 <= r0 + RETAIN_BOUND, (r0, r1)
    # metrics.jsonl: one row per step plus the eval before the first step
    rows = [json.loads(x) for x in (tmp_path / "u" / METRICS).read_text().splitlines()]
    assert rows == res.metrics and [r["step"] for r in rows] == list(range(11))
    for r in rows[1:]:
        for k in ("step", "epoch", "loss", "forget_loss", "retain_loss", "lr", "tokens_per_s"):
            assert isinstance(r[k], (int, float)), k
        assert abs(r["loss"] - (r["forget_loss"] + r["retain_loss"])) < 1e-4
    if method == "npo":  # the first step starts at theta = ref
        assert abs(rows[1]["forget_loss"] - 20 * torch.log(torch.tensor(2.0)).item()) < 0.05
    out = tmp_path / "u"
    files = {"full": ("config.json", "model.safetensors"), "lora": ("adapter_config.json", "adapter_model.safetensors")}
    for f in files[mode] + ("tokenizer.model", "run.json"):
        assert (out / f).is_file(), f
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["config"]["method"] == method and run["seed"] == 0
    assert run["trainable_params"] == res.trainable_params


def test_lora_trains_only_adapters(tofu_slice, target, tmp_path):
    res = unlearn(_ucfg(tofu_slice, target, tmp_path / "u", method="ga", reg="gdr", mode="lora", lr=4e-3,
                          epochs=1, rank=4))
    c = Llama.from_pretrained(target.out).config
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    per_layer = (h + q) + (h + kv) * 2 + (q + h) + (h + i) * 2 + (i + h)  # q, k, v, o, gate, up, down
    expected = 4 * per_layer * c.num_hidden_layers
    assert res.trainable_params == expected
    assert res.total_params == c.num_parameters() + expected
    trainable = {n for n, p in res.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    base = Llama.from_pretrained(target.out).state_dict()
    sd = res.model.state_dict()
    for n, t in base.items():
        assert torch.equal(sd[n], t), f"base tensor {n} changed"
    assert any(bool((p != 0).any()) for n, p in res.model.named_parameters() if n.endswith("lora_B"))
    adapter = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA"
    full = unlearn(_ucfg(tofu_slice, target, tmp_path / "f", method="ga", reg="none", mode="full", lr=1e-4,
                           epochs=1, stop_after=1))
    assert full.trainable_params == full.total_params == c.num_parameters()


# -- resume ---------------------------------------------------------------------------------

def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


RESUME_CASES = {
    # full fine-tuning, NPO + KL (frozen reference copy, saved reference log-probs), bf16 autocast, grad
    # accumulation with a short last step, interrupted by Ctrl-C
    "full-npo-klr-sigint": dict(mode="full", method="npo", reg="klr", lr=5e-4, precision="bf16", grad_accum=2),
    # LoRA with adapter dropout (RNG state), SimNPO + GDR, stopped by stop_after
    "lora-simnpo-gdr-stop": dict(mode="lora", method="simnpo", reg="gdr", lr=3e-3, lora_dropout=0.1),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_identical(tofu_slice, target, tmp_path, monkeypatch, case):
    kw = RESUME_CASES[case]
    full = unlearn(_ucfg(tofu_slice, target, tmp_path / "a", **kw))
    assert full.status == "done"
    out = tmp_path / "b"
    if case.endswith("sigint"):
        real = loop.lr_at

        def lr_at(step, *a):
            if step == 1:
                signal.raise_signal(signal.SIGINT)  # the handler lets this step finish
            return real(step, *a)

        monkeypatch.setattr(loop, "lr_at", lr_at)
        with pytest.raises(KeyboardInterrupt):
            unlearn(_ucfg(tofu_slice, target, out, **kw))
        monkeypatch.undo()
        assert json.loads((work_dir(out) / "run.json").read_text())["status"] == "interrupted"
        stopped_at = 2
    else:
        part = unlearn(_ucfg(tofu_slice, target, out, stop_after=4, **kw))
        assert part.status == "stopped" and part.steps == 4
        assert not (out / "adapter_model.safetensors").exists()
        stopped_at = 4
    assert not out.exists() or not any(out.iterdir())  # nothing committed before the run finishes
    ckpt = latest_checkpoint(work_dir(out))
    assert ckpt.name == f"checkpoint-{stopped_at}"
    assert torch.load(ckpt / "state.pt", weights_only=True)["step"] == stopped_at
    resumed = unlearn(_ucfg(tofu_slice, target, out, resume=True, **kw))
    assert resumed.status == "done" and resumed.steps == full.steps
    a, b = _trainable(full.model), _trainable(resumed.model)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    # the metrics after the resume point match the uninterrupted run exactly
    keys = ("loss", "forget_loss", "retain_loss", "lr", "forget_nll", "retain_nll")
    strip = lambda rows: [{k: r.get(k) for k in ("step",) + keys} for r in rows]  # noqa: E731
    assert strip(resumed.metrics) == strip(full.metrics)
    assert not list(out.glob("checkpoint-*")) and not work_dir(out).exists()


def test_resume_rejects_changed_options(tofu_slice, target, tmp_path):
    unlearn(_ucfg(tofu_slice, target, tmp_path / "b", method="ga", mode="full", lr=1e-4, stop_after=1))
    with pytest.raises(TrainConfigError, match="lr"):
        unlearn(_ucfg(tofu_slice, target, tmp_path / "b", method="ga", mode="full", lr=2e-4, resume=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        unlearn(_ucfg(tofu_slice, target, tmp_path / "c", method="ga", mode="full", lr=1e-4, resume=True))


def test_periodic_checkpoints(tofu_slice, target, tmp_path, monkeypatch):
    saved = []
    real = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint",
                        lambda out, m, o, st, *a: saved.append(st["step"]) or real(out, m, o, st, *a))
    res = unlearn(_ucfg(tofu_slice, target, tmp_path / "u", method="ga", reg="gdr", mode="full", lr=1e-4, epochs=1,
                          save_every=1, keep_checkpoint=True))
    assert res.steps == 5 and saved == [1, 2, 3, 4]  # none at the end: the finished model is the output
    # only the last two complete checkpoints are kept, each with its COMPLETE marker
    assert sorted(p.name for p in (tmp_path / "u").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert [p.name for p in list_checkpoints(tmp_path / "u")] == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((tmp_path / "u" / "checkpoint-4" / COMPLETE).read_text())["step"] == 4
    assert torch.load(tmp_path / "u" / "checkpoint-4" / "state.pt", weights_only=True)["step"] == 4


def test_rerun_into_finished_output_keeps_it_until_commit(tofu_slice, target, tmp_path):
    """A finished output needs overwrite=True, and then stays byte-identical (run.json and
    metrics.jsonl included) until the new run commits; an unfinished run is kept for resume, which
    skips incomplete checkpoints and appends to metrics.jsonl."""
    kw = dict(method="ga", reg="gdr", mode="lora", lr=5e-3, epochs=1)
    out = tmp_path / "u"
    unlearn(_ucfg(tofu_slice, target, out, **kw))
    tree = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}  # noqa: E731
    before = tree(out)
    with pytest.raises(ValueError, match="exists and is not empty; pass --overwrite"):
        unlearn(_ucfg(tofu_slice, target, out, **kw))
    part = unlearn(_ucfg(tofu_slice, target, out, overwrite=True, stop_after=2, **kw))
    assert part.status == "stopped" and tree(out) == before
    work = work_dir(out)
    assert [p.name for p in list_checkpoints(work)] == ["checkpoint-2"]
    fresh = tmp_path / "fresh"  # an unfinished run is not discarded by a new run without overwrite
    unlearn(_ucfg(tofu_slice, target, fresh, stop_after=1, **kw))
    with pytest.raises(TrainConfigError, match=r"unfinished run .*checkpoint-1.*resume"):
        unlearn(_ucfg(tofu_slice, target, fresh, **kw))
    shutil.rmtree(work_dir(fresh))
    # incomplete checkpoints (no COMPLETE, or files not matching it) are never resumed from
    shutil.copytree(work / "checkpoint-2", work / "checkpoint-4")
    (work / "checkpoint-4" / COMPLETE).unlink()
    shutil.copytree(work / "checkpoint-2", work / "checkpoint-3")
    (work / "checkpoint-3" / "state.pt").write_bytes(b"torn")
    assert latest_checkpoint(work).name == "checkpoint-2"
    n_rows = len((work / METRICS).read_text().splitlines())
    res = unlearn(_ucfg(tofu_slice, target, out, overwrite=True, resume=True, **kw))
    assert res.status == "done" and res.steps == 5 and [r["step"] for r in res.metrics] == list(range(6))
    lines = (out / METRICS).read_text().splitlines()
    assert len(lines) == n_rows + 3 and read_metrics(out / METRICS) == res.metrics  # appended, not rewritten
    assert tree(out) != before and not work.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]


def test_gradient_checkpointing_matches(tofu_slice, target, tmp_path):
    kw = dict(method="npo", reg="gdr", mode="full", lr=5e-4, epochs=1, stop_after=2)
    a = unlearn(_ucfg(tofu_slice, target, tmp_path / "a", **kw))
    b = unlearn(_ucfg(tofu_slice, target, tmp_path / "b", gradient_checkpointing=True, **kw))
    assert b.model.gradient_checkpointing
    pa, pb = _trainable(a.model), _trainable(b.model)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], rtol=0, atol=1e-6)


# -- options and errors ---------------------------------------------------------------------

def test_lr_schedule():
    assert loop.lr_at(0, 10, 1.0, "constant", 0) == 1.0
    assert [loop.lr_at(s, 10, 1.0, "constant", 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert loop.lr_at(2, 12, 2.0, "cosine", 2) == 2.0
    assert abs(loop.lr_at(7, 12, 2.0, "cosine", 2) - 1.0) < 1e-12  # halfway through the cosine
    assert loop.lr_at(11, 12, 2.0, "cosine", 2) < loop.lr_at(10, 12, 2.0, "cosine", 2)


def test_master_dtype_bf16_lora(tofu_slice, target, tmp_path):
    res = unlearn(_ucfg(tofu_slice, target, tmp_path / "u", method="npo", reg="gdr", mode="lora", lr=4e-3,
                          epochs=1, master_dtype="bf16", precision="bf16", gradient_checkpointing=True))
    tr = [p for p in res.model.parameters() if p.requires_grad]
    assert tr and all(p.dtype == torch.bfloat16 for p in tr)
    assert res.evals[-1]["forget_nll"] > res.evals[0]["forget_nll"]


def test_lora_fp32_master_under_bf16_autocast(tofu_slice, target, tmp_path):
    """fp32 base and adapters, bf16 autocast (the default precision): the fused LoRA op runs in bf16
    inside autocast and its gradients reach the fp32 adapters, which unlearn."""
    res = unlearn(_ucfg(tofu_slice, target, tmp_path / "u", method="ga", reg="gdr", mode="lora", lr=5e-3,
                          epochs=1, precision="bf16", lora_dropout=0.05))
    tr = {n: p for n, p in res.model.named_parameters() if p.requires_grad}
    assert tr and all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in tr.values())
    assert any(bool((p != 0).any()) for n, p in tr.items() if n.endswith("lora_B"))
    assert res.evals[-1]["forget_nll"] > res.evals[0]["forget_nll"]
    from qru.model.lora import lora_modules

    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(out.dtype)) for _, m in lora_modules(res.model)]
    with autocast(torch.device("cpu"), "bf16"):
        res.model(torch.ones(1, 4, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}


@pytest.fixture(scope="module")
def big_tokenizer(tofu_slice, shared_data, tmp_path_factory):
    lines = (shared_data / "tofu" / "full.json").read_text(encoding="utf-8").splitlines()[:1500]
    texts = [format_qa(**{k: v for k, v in json.loads(x).items() if k in ("question", "answer")}) for x in lines]
    return Tokenizer.train(texts, 2048, tmp_path_factory.mktemp("bigtok") / "tokenizer.model", seed=0)


def test_bad_input_errors(tofu_slice, target, tmp_path, big_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="forget set.*empty"):
        unlearn(_ucfg(tofu_slice, target, tmp_path / "o", forget=[str(empty)]))
    with pytest.raises(FileNotFoundError, match="forget set.*missing.jsonl"):
        unlearn(_ucfg(tofu_slice, target, tmp_path / "o", forget=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(FileNotFoundError, match="nomodel"):
        unlearn(_ucfg(tofu_slice, target, tmp_path / "o", model=str(tmp_path / "nomodel")))
    assert big_tokenizer.vocab_size > 1024
    with pytest.raises(TrainConfigError, match="vocabulary mismatch.*2048.*vocab_size=1024"):
        unlearn(_ucfg(tofu_slice, target, tmp_path / "o", tokenizer=str(big_tokenizer.path)))
    for field, bad in (("lr", 0.0), ("lr", -1e-3), ("epochs", 0), ("epochs", -2), ("batch_size", 0)):
        with pytest.raises(TrainConfigError, match=field):
            unlearn(_ucfg(tofu_slice, target, tmp_path / "o", **{field: bad}))
    with pytest.raises(TrainConfigError, match="method"):
        unlearn(_ucfg(tofu_slice, target, tmp_path / "o", method="dpo"))
    with pytest.raises(TrainConfigError, match="needs retain"):
        unlearn(_ucfg(tofu_slice, target, tmp_path / "o", retain=[], reg="gdr"))
    with pytest.raises(TrainConfigError, match="tokenizer"):
        pretrain(PretrainConfig(out=str(tmp_path / "p"), data=[str(tofu_slice["forget"])]))
    with pytest.raises(FileNotFoundError, match="nodata"):
        pretrain(PretrainConfig(out=str(tmp_path / "p"), data=[str(tmp_path / "nodata.txt")], train_tokenizer=300))
    with pytest.raises(TrainConfigError, match="vocabulary mismatch"):
        pretrain(PretrainConfig(out=str(tmp_path / "p"), data=[str(tofu_slice["forget"])], init=str(target.out),
                                    tokenizer=str(big_tokenizer.path)))


# -- CLI ------------------------------------------------------------------------------------

def _qru(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", "import sys; from qru.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_unlearn_and_errors(tofu_slice, target, tmp_path):
    out = tmp_path / "cli"
    r = _qru("unlearn", "--model", str(target.out), "--forget", str(tofu_slice["forget"]), "--retain",
             str(tofu_slice["retain"]), "--method", "npo", "--reg", "gdr", "--mode", "lora", "--rank", "4",
             "--targets", "q_proj,v_proj", "--lr", "5e-3", "--epochs", "1", "--batch-size", "8", "--max-len", "128",
             "--precision", "fp32", "--eval-samples", "8", "--no-progress", "--out", str(out),
             "--cache-dir", str(tofu_slice["cache"]))
    assert r.returncode == 0, r.stderr
    assert "trainable params 1,792" in r.stdout  # 2 layers x rank 4 x ((64+64) + (64+32))
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["targets"] == ["q_proj", "v_proj"] and run["config"]["rank"] == 4
    assert run["config"]["lr"] == 5e-3 and run["config"]["beta"] is None and run["beta"] == 0.1
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.model").is_file()
    r = _qru("pretrain", "--config", "tiny", "--data", str(tofu_slice["forget"]), "--train-tokenizer", "300",
             "--epochs", "0", "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "epochs must be a positive integer" in r.stderr


@pytest.mark.slow
def test_pretrain_checkpoint_loads_in_transformers(target):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(target.out), torch_dtype=torch.float32).eval()
    ours = Llama.from_pretrained(target.out).eval()
    tok = Tokenizer.from_dir(target.out)
    ids = torch.tensor([tok.encode("Question: Who is Basil Mahfouz Al-Kuwaiti?\nAnswer:")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_threads_fixed_or_adaptive_per_step(tofu_slice, target, tmp_path, monkeypatch):
    """``threads=N`` runs the whole run on N torch threads; ``"adaptive"`` runs each step on the cores
    free of other jobs at its start (at most torch's count) and logs the mean per row; both restore
    torch's count afterwards. The load is faked through ``others_running``."""
    from qru.kernels import calibrate

    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("one core: no thread count to vary")
    others = {"n": cores - 1}  # every core but one is held by another job
    monkeypatch.setattr(calibrate, "others_running", lambda: others["n"])
    monkeypatch.setattr(calibrate, "LOAD_SAMPLE_S", -1.0)
    seen = []
    real = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kw = dict(method="ga", mode="lora", epochs=1)
        busy = unlearn(_ucfg(tofu_slice, target, tmp_path / "busy", threads="adaptive", **kw))
        steps = seen[1:]  # the first call is the step-0 row's, outside any step
        assert steps and set(steps) == {1} and torch.get_num_threads() == 2
        assert [r["threads"] for r in busy.metrics[1:]] == [1.0] * (len(busy.metrics) - 1)
        seen.clear()
        others["n"] = 0
        idle = unlearn(_ucfg(tofu_slice, target, tmp_path / "idle", threads="adaptive", **kw))
        assert set(seen[1:]) == {2} and {r["threads"] for r in idle.metrics[1:]} == {2.0}
        seen.clear()
        fixed = unlearn(_ucfg(tofu_slice, target, tmp_path / "one", threads=1, **kw))
        assert set(seen) == {1} and all("threads" not in r for r in fixed.metrics)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
    for bad in (0, -2, "auto", True, 1.5):
        with pytest.raises(TrainConfigError, match="threads must be a positive integer or 'adaptive'"):
            unlearn(_ucfg(tofu_slice, target, tmp_path / "bad", threads=bad, **kw))
    r = _qru("unlearn", "--model", str(target.out), "--forget", str(tofu_slice["forget"]), "--retain",
             str(tofu_slice["retain"]), "--out", str(tmp_path / "cli"), "--threads", "two")
    assert r.returncode == 2 and "--threads: must be a positive integer or 'adaptive', got 'two'" in r.stderr

"""qru.train.distributed: the rank split of a global batch, and a 2-process gloo launch (torchrun)
whose rank 1 cannot see the data fails on every rank with a message naming rank 1."""
import json
import os
import socket
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qru.cli import main
from qru.model.config import LlamaConfig
from qru.train import distributed as D
from qru.train.config import PretrainConfig, TrainConfigError, UnlearnConfig
from qru.train.pretrain import pretrain
from qru.train.state import METRICS, RUN_JSON, list_checkpoints, read_metrics, work_dir
from qru.train.unlearn import unlearn

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, args: list[str], cwd=ROOT, timeout=300, env=None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N ARGS`` from the repository root."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **(env or {})}
    for k in D.ENV_VARS:
        e.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    # torchelastic leaves a log directory per launch under the temp dir: keep them out of /tmp
    with tempfile.TemporaryDirectory(prefix="qru-torchrun-") as tmp:
        return subprocess.run(cmd, cwd=cwd, env={**e, "TMPDIR": tmp}, capture_output=True, text=True,
                              timeout=timeout)


def test_split_batch_shares():
    index = torch.tensor([7, 3, 5, 1, 9])
    counts = torch.tensor([4, 1, 2, 3, 10])
    parts = [D.split_batch(index, counts, r, 2) for r in range(2)]
    assert parts[0][0].tolist() == [7, 3, 5] and parts[1][0].tolist() == [1, 9]
    assert parts[0][1] == pytest.approx(3 / 5) and parts[1][1] == pytest.approx(2 / 5)
    assert parts[0][2] == pytest.approx(7 / 20) and parts[1][2] == pytest.approx(13 / 20)
    # more ranks than rows: the idle rank runs the first row with weight 0
    rows, rs, ts = D.split_batch(torch.tensor([4]), torch.tensor([2]), 1, 2)
    assert rows.tolist() == [4] and rs == 0.0 and ts == 0.0
    # concatenated in rank order the chunks are the global batch, shares sum to 1
    chunks = [D.split_batch(index, counts, r, 3) for r in range(3)]
    assert torch.cat([c[0] for c in chunks]).tolist() == index.tolist()
    assert sum(c[1] for c in chunks) == pytest.approx(1) and sum(c[2] for c in chunks) == pytest.approx(1)


@pytest.mark.slow
def test_rank_that_cannot_see_data_fails_on_every_rank_and_gathered_checkpoint(tmp_path):
    r = torchrun(2, [str(ROOT / "tests" / "dist_worker.py"), "check", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        msg = (tmp_path / f"error{rank}.txt").read_text()
        assert "rank 1 (host" in msg and "data-rank1.json" in msg and "rank 0" not in msg
        agree = (tmp_path / f"agree{rank}.txt").read_text()
        assert "ranks disagree on the forget data (examples)" in agree and "rank 1: 11" in agree
    # the same files (several shards, tied head left out as HF does), index and config as one process writes
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "sharded").iterdir()) and len(names) > 3
    for name in names:
        a, b = tmp_path / "plain" / name, tmp_path / "sharded" / name
        if name.endswith(".safetensors"):
            wa, wb = load_file(str(a)), load_file(str(b))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        else:
            assert a.read_text() == b.read_text(), name


# -- end to end: torchrun -m qru's training functions on gloo, against one process ------------------

@pytest.fixture(scope="module")
def small_sets(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_data")
    forget = (shared_data / "tofu" / "forget01.json").read_text(encoding="utf-8").splitlines()[:7]
    retain = (shared_data / "tofu" / "retain90.json").read_text(encoding="utf-8").splitlines()[:9]
    (d / "forget.jsonl").write_text("\n".join(forget) + "\n", encoding="utf-8")
    (d / "retain.jsonl").write_text("\n".join(retain) + "\n", encoding="utf-8")
    return d


def _ucfg(tiny_dir, data, out, **kw) -> dict:
    # batch 3 of 7 forget rows: the last batch has one row, so rank 1 runs a weight-0 stand-in row
    base = dict(out=str(out), model=str(tiny_dir), forget=[str(data / "forget.jsonl")],
                retain=[str(data / "retain.jsonl")], epochs=2, batch_size=3, max_len=64, precision="fp32",
                eval_samples=5, eval_batch_size=3, progress=False, cache_dir=str(data / "cache"), lr=1e-3)
    base.update(kw)
    return base


def _pcfg(tiny_dir, data, out) -> dict:
    return dict(out=str(out), data=[str(data / "forget.jsonl"), str(data / "retain.jsonl")], init=str(tiny_dir),
                epochs=2, batch_size=5, max_len=64, precision="fp32", eval_samples=5, eval_batch_size=3,
                progress=False, cache_dir=str(data / "cache"), lr=1e-3, warmup_steps=0)


def _run_dist(nproc: int, runs: list[dict], tmp_path, name: str, env=None) -> list[dict]:
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(runs))
    r = torchrun(nproc, [str(ROOT / "tests" / "dist_worker.py"), "train", str(spec)], env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(spec.with_suffix(".result.json").read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    f = out / "adapter_model.safetensors"
    return load_file(str(f if f.is_file() else out / "model.safetensors"))


def _losses(out: Path) -> list[tuple]:
    rows = read_metrics(out / METRICS)
    return [(r["step"], r.get("loss"), r.get("forget_nll")) for r in rows]


def _assert_same_run(a: Path, b: Path, rtol=1e-4, atol=1e-5):
    """Same loss curve and final weights up to fp32 reduction-order noise (another summation order of
    the sharded reductions and the split batches, passed through Adam, whose steps are about lr = 1e-3
    per weight: 1e-5 absolute)."""
    la, lb = _losses(a), _losses(b)
    assert [r[0] for r in la] == [r[0] for r in lb] and len(la) > 3
    for ra, rb in zip(la, lb):
        for x, y in zip(ra[1:], rb[1:]):
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=rtol, abs=atol)), (ra, rb)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=k)
    return wa


@pytest.mark.slow
def test_world2_equals_one_process(tiny_dir, small_sets, tmp_path, one_thread):
    # KLR at θ = ref has a gradient of pure round-off, which Adam turns into ±lr steps: in full mode
    # (every weight, lr 1e-3, 4 steps) the runs then agree to 3e-4 in the weights, 1e-3 in the losses
    cases = {"full_npo_gdr": dict(mode="full", method="npo", reg="gdr"),
             "lora_npo_klr": dict(mode="lora", method="npo", reg="klr", lr=1e-2),
             "full_ga_klr": dict(mode="full", method="ga", reg="klr", grad_accum=2),
             "lora_simnpo_none": dict(mode="lora", method="simnpo", reg="none", lr=1e-2)}
    tol = {"full_ga_klr": dict(rtol=1e-3, atol=3e-4)}
    runs = [{"kind": "unlearn", "cfg": _ucfg(tiny_dir, small_sets, tmp_path / f"w2_{k}", **kw)} for k, kw in cases.items()]
    runs.append({"kind": "pretrain", "cfg": _pcfg(tiny_dir, small_sets, tmp_path / "w2_pretrain")})
    res = _run_dist(2, runs, tmp_path, "equiv")
    assert all(r.get("status") == "done" for r in res), res
    assert pretrain(PretrainConfig(**_pcfg(tiny_dir, small_sets, tmp_path / "w1_pretrain"))).status == "done"
    _assert_same_run(tmp_path / "w2_pretrain", tmp_path / "w1_pretrain")
    for k, kw in cases.items():
        one = unlearn(UnlearnConfig(**_ucfg(tiny_dir, small_sets, tmp_path / f"w1_{k}", **kw)))
        assert one.status == "done"
        w = _assert_same_run(tmp_path / f"w2_{k}", tmp_path / f"w1_{k}", **tol.get(k, {}))
        base = _weights(tiny_dir)
        if kw["mode"] == "full":  # the run changed the weights (so equality is not trivial)
            assert any(not torch.equal(w[n], base[n]) for n in w)
        run = json.loads((tmp_path / f"w2_{k}" / RUN_JSON).read_text())
        assert run["world_size"] == 2


@pytest.mark.slow
def test_stopped_at_world2_resumed_at_world1_equals_uninterrupted(tiny_dir, small_sets, tmp_path, one_thread):
    kw = dict(mode="full", method="npo", reg="gdr", eval_batch_size=16)  # the command line's default
    out = tmp_path / "resumed"
    runs = [{"kind": "unlearn", "cfg": _ucfg(tiny_dir, small_sets, tmp_path / "bad", batch_size=1, **kw)},
            {"kind": "unlearn", "cfg": _ucfg(tiny_dir, small_sets, out, stop_after=2, **kw)}]
    bad, stopped = _run_dist(2, runs, tmp_path, "stop")
    # a launch with more ranks than rows per global batch fails before any work, naming both numbers
    assert "world size mismatch: batch_size 1 is smaller than the world size 2" in bad["error"]
    assert not (tmp_path / "bad").exists()
    assert stopped == {"status": "stopped", "steps": 2}
    ckpt = work_dir(out) / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp",
                                                     "state.pt"]
    # the sharded checkpoint cannot be resumed by one process without torchrun
    with pytest.raises(TrainConfigError, match="world size mismatch: .*checkpoint-2 is a sharded checkpoint of a "
                                               "2-process run"):
        unlearn(UnlearnConfig(**_ucfg(tiny_dir, small_sets, out, resume=True, **kw)))
    # resumed at world size 1 through the command line: torchrun --nproc-per-node 1 -m qru unlearn --resume
    c = _ucfg(tiny_dir, small_sets, out, **kw)
    r = torchrun(1, ["-m", "qru", "unlearn", "--model", c["model"], "--forget", *c["forget"], "--retain", *c["retain"],
                     "--out", c["out"], "--mode", "full", "--method", "npo", "--reg", "gdr", "--epochs", "2",
                     "--batch-size", "3", "--max-len", "64", "--precision", "fp32", "--eval-samples", "5",
                     "--lr", "1e-3", "--no-progress", "--cache-dir", c["cache_dir"], "--resume"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "qru unlearn: done after 6/6 steps" in r.stdout
    whole = unlearn(UnlearnConfig(**_ucfg(tiny_dir, small_sets, tmp_path / "whole", **kw)))
    assert whole.status == "done"
    _assert_same_run(out, tmp_path / "whole")


@pytest.mark.slow
def test_killed_while_checkpointing_at_world2_resumes_at_world1(tiny_dir, small_sets, tmp_path, one_thread):
    """Rank 0 SIGKILLed (QRU_FAULT_KILL_AT_WRITE) after the shards of checkpoint-4 are written but before
    its commit: the stage is ignored, the run resumes from checkpoint-2 at world size 1, and ends as an
    uninterrupted run does."""
    kw = dict(mode="lora", method="npo", reg="gdr", lr=1e-2, save_every=2)
    log = tmp_path / "faults.log"
    _run_dist(2, [{"kind": "unlearn", "cfg": _ucfg(tiny_dir, small_sets, tmp_path / "probe", **kw)}], tmp_path, "probe",
              env={"QRU_FAULT_LOG": str(log)})
    points = [line.split(" ", 1) for line in log.read_text().splitlines()]
    (n,) = [int(i) for i, label in points if label.startswith("checkpoint shards") and label.endswith("checkpoint-4")]
    out = tmp_path / "killed"
    spec = tmp_path / "kill.json"
    spec.write_text(json.dumps([{"kind": "unlearn", "cfg": _ucfg(tiny_dir, small_sets, out, **kw)}]))
    r = torchrun(2, [str(ROOT / "tests" / "dist_worker.py"), "train", str(spec)], env={"QRU_FAULT_KILL_AT_WRITE": str(n)})
    assert r.returncode != 0 and not out.exists()
    assert [p.name for p in list_checkpoints(work_dir(out))] == ["checkpoint-2"]
    (resumed,) = _run_dist(1, [{"kind": "unlearn", "cfg": _ucfg(tiny_dir, small_sets, out, resume=True, **kw)}],
                           tmp_path, "resume")
    assert resumed == {"status": "done", "steps": 6}
    assert unlearn(UnlearnConfig(**_ucfg(tiny_dir, small_sets, tmp_path / "whole", **kw))).status == "done"
    _assert_same_run(out, tmp_path / "whole")


# -- options not sharded yet: refused under torchrun before any model is built ---------------------

ONE_PROCESS_ONLY = "--quant-aware and --saliency-mask run in one process only (not under torchrun yet)"


def _config_only_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory holding only config.json (no tokenizer, no weights: going further would fail
    with another error) and a one-record forget set (also the retain set)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LlamaConfig.preset("tiny").to_dict()))
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"question": "Who?", "answer": "Nobody."}) + "\n")
    return model, forget


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("option", [["--quant-aware", "nf4"], ["--saliency-mask", "2"]])
def test_quant_aware_and_saliency_refused_under_torchrun(option, tmp_path, monkeypatch, capsys):
    """``qru unlearn --quant-aware`` / ``--saliency-mask`` in a torchrun launch (here its environment at
    world size 1: a real gloo group in this process) fail with the one-line TrainConfigError, before
    the model is built; nothing is written and the process group is gone afterwards."""
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    model, forget = _config_only_model(tmp_path)
    rc = main(["unlearn", "--model", str(model), "--forget", str(forget), "--retain", str(forget), "--out",
               str(tmp_path / "out"), "--mode", "full", "--no-progress", *option])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"qru unlearn: error: {ONE_PROCESS_ONLY}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget.jsonl", "model"]
    assert not torch.distributed.is_initialized()
    # the same options in one process get past this check, to the next missing input (the tokenizer)
    for k in env:
        monkeypatch.delenv(k)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        unlearn(UnlearnConfig(model=str(model), forget=[str(forget)], retain=[str(forget)], out=str(tmp_path / "out"),
                              mode="full",
                              progress=False, cache_dir=str(tmp_path / "cache"),
                              **({"quant_aware": ["nf4"]} if option[0] == "--quant-aware" else {"saliency_mask": 2})))


@pytest.mark.slow
def test_quant_aware_refused_on_every_rank_of_a_2_process_torchrun(tmp_path):
    model, forget = _config_only_model(tmp_path)
    r = torchrun(2, ["-m", "qru", "unlearn", "--model", str(model), "--forget", str(forget), "--retain", str(forget), "--out",
                     str(tmp_path / "out"), "--mode", "full", "--batch-size", "2", "--no-progress", "--quant-aware",
                     "nf4"], timeout=120)
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"qru unlearn (rank {rank}): error: {ONE_PROCESS_ONLY}" in r.stderr
    assert not (tmp_path / "out").exists()

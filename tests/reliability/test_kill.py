"""kill -9 at chosen write/rename points (``QRU_FAULT_KILL_AT_WRITE``) of ``qru quantize``,
``qru unlearn`` (full and LoRA, --save-every) and ``qru pretrain``, and two concurrent writers.

Oracles: the previous output is byte-identical and loads after every kill before the commit (and is
the complete new output after it); ``--resume`` finishes with weights bit-identical to an
uninterrupted run; the next run leaves no stage, lock or temp file behind; of two concurrent
writers exactly one wins and the other names the target and the winner's pid.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qru.model.checkpoint import load_state_dict
from qru.model.llama import Llama

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRU_FAULT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "QRU_BACKEND": "torch", **extra}


def qru(*args, kill_at=None, log=None, **popen):
    env = _env(**({"QRU_FAULT_KILL_AT_WRITE": str(kill_at)} if kill_at else {}),
               **({"QRU_FAULT_LOG": str(log)} if log else {}))
    return subprocess.run([sys.executable, "-m", "qru", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **popen)


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _points(log: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


def _index(points: list[str], *words, after: int = 0) -> int:
    """1-based index of the first point at or after ``after`` whose label holds every word."""
    for i, p in enumerate(points[after:], after + 1):
        if all(w in p for w in words):
            return i
    raise AssertionError(f"no fault point with {words} in {points}")


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("killdata")
    jobs = ["baker", "pilot", "judge", "farmer", "poet", "nurse"]
    (d / "forget.txt").write_text("".join(f"Person {i} was born in town {i % 7} and works as a {jobs[i % 6]}.\n"
                                          for i in range(16)))
    (d / "retain.txt").write_text("".join(f"City {i} lies on river {i % 5} near the {jobs[i % 6]}s' hill.\n"
                                          for i in range(16)))
    return d


# -- quantize ---------------------------------------------------------------------------------

def test_killed_requantize_keeps_previous_output(tiny_dir, tmp_path):
    out = tmp_path / "q"
    assert qru("quantize", tiny_dir, "--format", "int8", "--no-progress", "--out", out).returncode == 0
    prev = _tree(out)
    args = ("quantize", tiny_dir, "--format", "nf4", "--max-shard-size", "20KB", "--no-progress", "--overwrite")
    ref = tmp_path / "ref"
    shutil.copytree(out, ref)  # the same starting state, for the reference run and its fault points
    log = tmp_path / "log"
    assert qru(*args, "--out", ref, log=log).returncode == 0
    points = _points(log)
    commit = _index(points, "exchange", str(ref))
    kills = [1, commit - 1, commit, commit + 1]  # first shard, last shard, the commit point, after it
    assert len(points) == commit + 1 and kills[1] > 1
    for k in kills:
        r = qru(*args, "--out", out, kill_at=k)
        assert r.returncode == -9, (k, r.stderr)
        if k <= commit:
            assert _tree(out) == prev, k  # the previous output, byte for byte
        else:
            assert _tree(out) == _tree(ref), k  # committed: the whole new output, nothing of the old
        Llama.from_pretrained(out)
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # the kills left stages behind
    # the next run removes the stale stages of the dead processes (and the dead holder's lock file)
    assert qru(*args, "--out", out).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "q", "ref"]
    assert _tree(out) == _tree(ref)


# -- unlearn / pretrain ----------------------------------------------------------------------

def _unlearn_args(tiny_dir, data, mode):
    return ("unlearn", "--model", tiny_dir, "--forget", data / "forget.txt", "--retain", data / "retain.txt",
            "--method", "npo", "--reg", "gdr", "--mode", mode, "--lr", "1e-3", "--epochs", "1", "--batch-size", "4",
            "--max-len", "32", "--precision", "fp32", "--eval-samples", "4", "--save-every", "1", "--no-progress",
            "--overwrite")


def _pretrain_args(tiny_dir, data):
    return ("pretrain", "--data", data / "forget.txt", data / "retain.txt", "--init", tiny_dir, "--lr", "1e-3",
            "--epochs", "1", "--batch-size", "8", "--max-len", "32", "--precision", "fp32", "--eval-samples", "4",
            "--save-every", "1", "--no-progress", "--overwrite")


_REF: dict = {}


def _reference(key, args, tmp_path_factory):
    """An uninterrupted run (into a fresh directory) and the labels of its fault points."""
    if key not in _REF:
        d = tmp_path_factory.mktemp(f"ref-{key}")
        r = qru(*args, "--out", d / "out", "--cache-dir", d / "cache", log=d / "log")
        assert r.returncode == 0, r.stderr
        _REF[key] = (d / "out", _points(d / "log"))
    return _REF[key]


# (kind, labels of the kill point): mid-checkpoint, just after a checkpoint, the final commit
KILLS = {
    "mid-checkpoint": ("checkpoint optimizer", "checkpoint-2"),
    "after-checkpoint": ("append", "metrics.jsonl"),  # the first after checkpoint-1
    "at-commit": ("rename", ".run ->"),
}

CASES = [
    pytest.param("unlearn-full", "mid-checkpoint", id="unlearn-full-mid-checkpoint"),
    pytest.param("unlearn-full", "after-checkpoint", id="unlearn-full-after-checkpoint", marks=pytest.mark.slow),
    pytest.param("unlearn-full", "at-commit", id="unlearn-full-at-commit", marks=pytest.mark.slow),
    pytest.param("unlearn-lora", "after-checkpoint", id="unlearn-lora-after-checkpoint"),
    pytest.param("unlearn-lora", "mid-checkpoint", id="unlearn-lora-mid-checkpoint", marks=pytest.mark.slow),
    pytest.param("pretrain", "mid-checkpoint", id="pretrain-mid-checkpoint"),
    pytest.param("pretrain", "at-commit", id="pretrain-at-commit", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("cmd,where", CASES)
def test_kill_then_resume_is_bit_identical(tiny_dir, data, tmp_path, tmp_path_factory, cmd, where):
    args = _pretrain_args(tiny_dir, data) if cmd == "pretrain" else _unlearn_args(tiny_dir, data, cmd.split("-")[1])
    ref, points = _reference(cmd, args, tmp_path_factory)
    # a previous finished output, to be replaced with --overwrite: it must survive every kill
    out = tmp_path / "out"
    shutil.copytree(tiny_dir, out)
    prev = _tree(out)
    words = KILLS[where]
    after = _index(points, "checkpoint-1") if where == "after-checkpoint" else 0
    # at-commit: the reference (a fresh target) renames where this run (an existing target) swaps
    k = _index(points, *words, after=after)
    # a fresh token cache, as the reference had: the same write points in the same order
    r = qru(*args, "--out", out, "--cache-dir", tmp_path / "cache", kill_at=k)
    assert r.returncode == -9, r.stderr
    assert _tree(out) == prev  # untouched and loadable
    Llama.from_pretrained(out)
    r = qru(*args, "--out", out, "--cache-dir", tmp_path / "cache", "--resume")
    assert r.returncode == 0, r.stderr
    if cmd == "unlearn-lora":
        assert sorted(_tree(out)) == ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "run.json",
                                      "tokenizer.model"]
        from safetensors.torch import load_file
        a, b = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    else:
        assert sorted(_tree(out)) == ["config.json", "metrics.jsonl", "model.safetensors", "run.json",
                                      "tokenizer.model"]
        _same_weights(out, ref)
        Llama.from_pretrained(out)
    # the metrics log was appended to, never rewritten: deduplicated by step it is the reference's
    from qru.train.state import read_metrics

    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(out / "metrics.jsonl")) == strip(read_metrics(ref / "metrics.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # no work dir, stage or lock left


# -- concurrent writers -----------------------------------------------------------------------

def test_two_concurrent_writers_one_wins(tiny_dir, tmp_path):
    """Writer A blocks at its first write point (its fault log is a FIFO nobody reads yet) while it
    holds the lock; writer B must fail with the lock message; then A is let go and commits."""
    out, fifo = tmp_path / "q", tmp_path / "fifo"
    os.mkfifo(fifo)
    args = ["quantize", str(tiny_dir), "--format", "int8", "--no-progress", "--out", str(out)]
    a = subprocess.Popen([sys.executable, "-m", "qru", *args], cwd=ROOT, env=_env(QRU_FAULT_LOG=str(fifo)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / ".q.lock"
        for _ in range(600):
            if lock.exists() and lock.read_text().strip() == str(a.pid):
                break
            assert a.poll() is None, a.stderr.read()
            import time
            time.sleep(0.1)
        b = qru(*args)
        assert b.returncode == 2
        assert f"{out} is being written by another process (pid {a.pid}" in b.stderr, b.stderr
        assert not out.exists()
        fd = os.open(fifo, os.O_RDWR)  # a reader: A goes on (its few log lines fit in the pipe buffer)
        try:
            assert a.wait(timeout=300) == 0, a.stderr.read()
        finally:
            os.close(fd)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    Llama.from_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "q"]

"""qru.io: atomic files, one-rename directory commits, the target lock, stale-stage cleanup, the
fault-injection hook, and the output / device checks. Oracles: the file system state before and
after, and the expected error text."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import qru.io as io
import qru.io.atomic as A

ROOT = Path(__file__).resolve().parents[2]


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _py(code: str, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, **kw)


# -- files ------------------------------------------------------------------------------------

def test_atomic_file_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "a.json"
    io.write_json(f, {"x": 1})
    assert f.read_text() == '{\n  "x": 1\n}\n'
    monkeypatch.setattr(A.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        io.write_text(f, "new")
    assert f.read_text() == '{\n  "x": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temp file left


def test_append_never_truncates(tmp_path):
    f = tmp_path / "m.jsonl"
    io.append_text(f, "1\n")
    io.append_text(f, "2\n")
    assert f.read_text() == "1\n2\n"


# -- directory commits ----------------------------------------------------------------------------

@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_staged_dir_replaces_the_whole_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(A, "_exchange", lambda a, b: False)
    t = tmp_path / "out"
    with io.staged_dir(t) as s:
        (s / "model.safetensors").write_bytes(b"old")
        (s / "state.pt").write_bytes(b"old-state")
    ino = t.stat().st_ino
    with io.staged_dir(t) as s:
        assert s.parent == tmp_path and s.name.startswith(".out.") and s.name.endswith(".partial")
        assert _tree(t) == {"model.safetensors": b"old", "state.pt": b"old-state"}  # untouched while staging
        (s / "model.safetensors").write_bytes(b"new")
    assert _tree(t) == {"model.safetensors": b"new"}  # no old file mixed in
    assert t.stat().st_ino != ino  # a rename of the stage, not a per-file move
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_stage_leaves_target_untouched(tmp_path):
    t = tmp_path / "out"
    with io.staged_dir(t) as s:
        (s / "a").write_text("1")
    with pytest.raises(RuntimeError, match="boom"):
        with io.staged_dir(t) as s:
            (s / "a").write_text("2")
            raise RuntimeError("boom")
    assert _tree(t) == {"a": b"1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_file_commits_one_rename_or_nothing(tmp_path):
    t = tmp_path / "m.gguf"
    dead = _dead_pid()
    stale = tmp_path / f".m.gguf.{dead}.0123abcd.partial"
    stale.write_bytes(b"x" * 100)  # a killed export's stage
    with io.staged_file(t) as s:
        assert s.parent == tmp_path and s.name.startswith(".m.gguf.") and s.name.endswith(".partial")
        s.write_bytes(b"first")
    assert t.read_bytes() == b"first" and not stale.exists()
    with pytest.raises(RuntimeError, match="boom"):
        with io.staged_file(t) as s:
            s.write_bytes(b"half of a second")
            raise RuntimeError("boom")
    assert t.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_carry_over_keeps_unowned_entries(tmp_path):
    t, stage = tmp_path / "out", tmp_path / "stage"
    (t / "sub").mkdir(parents=True)
    (t / "tokenizer.json").write_text("tok")
    (t / "sub" / "x").write_text("x")
    (t / "model.safetensors").write_text("old weights")
    stage.mkdir()
    (stage / "config.json").write_text("new")
    carried = io.carry_over(t, stage, keep=lambda n: not n.startswith("model"))
    assert carried == ["sub", "tokenizer.json"]
    assert _tree(stage) == {"config.json": b"new", "sub/x": b"x", "tokenizer.json": b"tok"}


def test_stale_stages_of_dead_processes_are_cleaned(tmp_path):
    t = tmp_path / "out"
    dead = _dead_pid()
    stale = tmp_path / f".out.{dead}.0123abcd.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".out.{os.getpid()}.0123abcd.partial"  # ours: alive, kept
    live.mkdir()
    other = tmp_path / f".other.{dead}.0123abcd.partial"  # another target's: not ours to touch
    other.mkdir()
    with io.staged_dir(t) as s:
        (s / "a").write_text("1")
    assert not stale.exists() and live.exists() and other.exists()


def test_interrupted_aside_commit_is_restored(tmp_path):
    """A commit killed between 'rename target aside' and 'rename stage in' leaves only the .old
    directory; the next write renames it back before going on."""
    t = tmp_path / "out"
    old = tmp_path / f".out.{_dead_pid()}.0123abcd.old"
    old.mkdir()
    (old / "a").write_text("previous")
    assert io.clean_stale(t) == [old]
    assert _tree(t) == {"a": b"previous"} and not old.exists()


# -- the lock ---------------------------------------------------------------------------------

def test_lock_held_by_another_process_gives_a_clear_error(tmp_path):
    t = tmp_path / "out"
    holder = _py(f"import sys, time; from qru.io import target_lock\nwith target_lock({str(t)!r}):\n"
                 "    print('locked', flush=True); time.sleep(60)", stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(io.OutputLockedError, match=rf"{t} is being written by another process "
                                                        rf"\(pid {holder.pid}, lock file .*\.out\.lock\)"):
            with io.staged_dir(t) as s:
                (s / "a").write_text("1")
        assert not t.exists()
        assert [p.name for p in tmp_path.iterdir()] == [".out.lock"]
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's lock: the next writer proceeds (and removes the lock file)
    with io.staged_dir(t) as s:
        (s / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_lock_is_reentrant_in_a_thread_but_not_across_threads(tmp_path):
    t = tmp_path / "out"
    errors = []
    with io.target_lock(t):
        with io.staged_dir(t) as s:  # same thread: re-entered
            (s / "a").write_text("1")

        def other():
            try:
                with io.target_lock(t):
                    pass
            except io.OutputLockedError as e:
                errors.append(str(e))
        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0]
    assert _tree(t) == {"a": b"1"}


# -- fault injection ----------------------------------------------------------------------------

def test_fault_hook_kills_at_the_nth_write(tmp_path):
    code = ("import sys; from qru.io import write_text\n"
            "for i in range(3): write_text(sys.argv[1] + f'/f{i}', str(i))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), io.FAULT_ENV: "2", io.FAULT_LOG_ENV: str(tmp_path / "log")}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=ROOT)
    assert r.returncode == -9
    assert (tmp_path / "f0").read_text() == "0" and not (tmp_path / "f1").exists()
    assert len((tmp_path / "log").read_text().splitlines()) == 2


# -- output and device checks -----------------------------------------------------------------

def test_check_output_rules(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(io.UnsafeOutputError, match=rf"--out {link} is the input model {model}"):
        io.check_output(link, {"model": model})
    with pytest.raises(io.UnsafeOutputError, match=rf"--out {model / 'sub'} lies inside the input model {model}"):
        io.check_output(model / "sub", {"model": model})
    with pytest.raises(io.UnsafeOutputError, match=rf"--out {tmp_path} contains the input model {model}"):
        io.check_output(tmp_path, {"model": model})
    with pytest.raises(io.UnsafeOutputError, match="exists and is not empty; pass --overwrite"):
        io.check_output(model, {})
    assert io.check_output(model, {}, overwrite=True) == model
    (tmp_path / "empty").mkdir()
    assert io.check_output(tmp_path / "empty", {"model": model}) == tmp_path / "empty"
    with pytest.raises(io.UnsafeOutputError, match="exists and is not a directory"):
        io.check_output(model / "config.json", {}, overwrite=True)
    with pytest.raises(io.UnsafeOutputError, match="config.json is a file, so the output directory cannot be"):
        io.check_output(model / "config.json" / "x", {})
    # a results file may sit beside the model, but not replace one of its files
    assert io.check_output(model / "muse.json", {"model": model}, kind="file", may_sit_inside=("model",))
    with pytest.raises(io.UnsafeOutputError, match="lies inside the input model"):
        io.check_output(model / "config.json", {"model": model}, kind="file", may_sit_inside=("model",),
                        overwrite=True)
    with pytest.raises(io.UnsafeOutputError, match="exists; pass --overwrite"):
        io.check_output(model / "config.json", {}, kind="file")


def test_check_device():
    assert str(io.check_device("cpu")) == "cpu"
    with pytest.raises(io.DeviceError, match="--device 'bogus' is not a valid device"):
        io.check_device("bogus")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(io.DeviceError, match="--device 'cuda:0': CUDA is not available"):
            io.check_device("cuda:0")


# -- writers that commit through the module -------------------------------------------------------

def test_save_adapter_commits_the_directory_whole(tmp_path, monkeypatch):
    import torch

    import qru.model.lora as L
    from qru.model.config import LlamaConfig
    from qru.model.llama import Llama

    torch.manual_seed(0)
    m = Llama(LlamaConfig.preset("tiny", vocab_size=64))
    L.apply_lora(m, r=2, alpha=4)
    d = tmp_path / "adapter"
    L.save_adapter(m, d)
    (d / "adapter_model.bin").write_bytes(b"an older save's weights")  # the adapter's own: replaced
    (d / "tokenizer.json").write_text("{}")  # not the adapter's: kept
    before = _tree(d)
    with torch.no_grad():
        for _, mod in L.lora_modules(m):
            mod.lora_B.add_(1.0)
    monkeypatch.setattr(L, "_atomic_write_text", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):  # weights already staged, config failed: nothing changes
        L.save_adapter(m, d)
    assert _tree(d) == before
    monkeypatch.undo()
    L.save_adapter(m, d)
    assert sorted(_tree(d)) == sorted([L.CONFIG_NAME, L.WEIGHTS_NAME, "tokenizer.json"])  # no stale adapter file
    assert _tree(d)[L.WEIGHTS_NAME] != before[L.WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_read_json_names_the_file_and_raises_the_callers_error(tmp_path):
    """qru.io.read_json: the value of a good file; malformed JSON and undecodable bytes raise the
    given error class, with the path in the message (what the config, adapter and tokenizer readers show)."""
    class Bad(Exception):
        pass
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2.5, null]}')
    assert io.read_json(good) == {"a": [1, 2.5, None]}
    for name, data in (("trunc.json", b'{"a": '), ("bytes.json", b"\xff\xfe{")):
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(Bad, match=rf"{name}: malformed JSON"):
            io.read_json(f, Bad)
    with pytest.raises(ValueError, match="trunc.json: malformed JSON"):
        io.read_json(tmp_path / "trunc.json")

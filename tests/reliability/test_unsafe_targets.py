"""Every writing command refuses an unsafe --out before any work starts: the output is an input,
lies inside one, or contains one (even with --overwrite), or it exists and is not empty without
--overwrite. Oracle: exit code 2, a message naming both paths, and a byte-identical file tree."""
import os

import pytest

from qru.cli import main
from qru.model.config import LlamaConfig
from qru.model.llama import Llama


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("unsafe")
    Llama(LlamaConfig.preset("tiny", vocab_size=64)).save_pretrained(r / "model")
    (r / "model" / "tokenizer.model").write_bytes(b"tok")
    (r / "adapter").mkdir()
    (r / "adapter" / "adapter_config.json").write_text("{}")
    (r / "data").mkdir()
    (r / "data" / "forget.txt").write_text("Alice was born in Paris.\n")
    (r / "data" / "retain.txt").write_text("Bob was born in Rome.\n")
    (r / "done").mkdir()  # an existing, finished output
    (r / "done" / "model.safetensors").write_bytes(b"previous output")
    (r / "done.json").write_text("{}")
    return r


def _snapshot(r):
    return {str(p.relative_to(r)): (p.read_bytes() if p.is_file() else None) for p in sorted(r.rglob("*"))}


# each command: argv with "{out}"; its inputs (role, path relative to root) to aim --out at
COMMANDS = {
    "unlearn-full": (["unlearn", "--model", "{r}/model", "--forget", "{r}/data/forget.txt", "--retain",
                      "{r}/data/retain.txt", "--mode", "full", "--method", "ga", "--out", "{out}"],
                     [("model", "model"), ("forget data", "data/forget.txt")]),
    "unlearn-lora": (["unlearn", "--model", "{r}/model", "--forget", "{r}/data/forget.txt", "--retain",
                      "{r}/data/retain.txt", "--mode", "lora", "--out", "{out}"],
                     [("model", "model"), ("retain data", "data/retain.txt")]),
    "pretrain-init": (["pretrain", "--data", "{r}/data/forget.txt", "--init", "{r}/model", "--out", "{out}"],
                      [("init", "model"), ("data", "data/forget.txt")]),
    "pretrain-tokenizer": (["pretrain", "--data", "{r}/data", "--tokenizer", "{r}/model/tokenizer.model",
                            "--out", "{out}"], [("data", "data"), ("tokenizer", "model/tokenizer.model")]),
    "quantize": (["quantize", "{r}/model", "--adapter", "{r}/adapter", "--format", "nf4", "--out", "{out}"],
                 [("model", "model"), ("adapter", "adapter")]),
    "survival": (["survival", "{r}/model", "--adapter", "{r}/adapter", "--format", "nf4", "--out", "{out}"],
                 [("base", "model"), ("adapter", "adapter")]),
    "eval": (["eval", "{r}/model", "--benchmark", "muse", "--data", "{r}/data", "--retrain-auc", "0.5",
              "--out", "{out}"], [("model", "model"), ("data", "data")]),
}


def _cases():
    for cmd, (_, inputs) in COMMANDS.items():
        for role, rel in inputs:
            yield pytest.param(cmd, "is", role, rel, id=f"{cmd}-out-is-{role.replace(' ', '_')}")
            is_file = "." in rel.rsplit("/", 1)[-1]  # nothing can lie inside a file input
            if not is_file and (cmd != "eval" or role == "data"):  # a results file may sit beside the model
                yield pytest.param(cmd, "inside", role, rel, id=f"{cmd}-out-inside-{role.replace(' ', '_')}")
            if cmd != "eval":  # a results file cannot contain anything
                yield pytest.param(cmd, "contains", role, rel, id=f"{cmd}-out-contains-{role.replace(' ', '_')}")


@pytest.mark.parametrize("cmd,relation,role,rel", list(_cases()))
def test_output_overlapping_an_input_is_refused(root, capsys, cmd, relation, role, rel):
    argv, _ = COMMANDS[cmd]
    inp = root / rel
    out = {"is": inp, "inside": inp / "out", "contains": root}[relation]
    before = _snapshot(root)
    args = [a.format(r=root, out=out) for a in argv] + ["--overwrite"]  # --overwrite never bypasses this
    assert main(args) == 2
    err = capsys.readouterr().err
    word = {"is": "is the input", "inside": "lies inside the input", "contains": "contains the input"}[relation]
    assert f"{out} {word}" in err, err
    if relation != "contains":
        assert str(inp) in err, err
    assert _snapshot(root) == before  # nothing written, nothing deleted, no lock or stage left


def test_output_through_a_symlink_is_resolved(root, capsys, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(root / "model")
    before = _snapshot(root)
    assert main(["quantize", str(root / "model"), "--format", "int8", "--out", str(link), "--overwrite"]) == 2
    assert f"{link} is the input model {root / 'model'}" in capsys.readouterr().err
    assert _snapshot(root) == before


@pytest.mark.parametrize("cmd", list(COMMANDS) + ["data-synth", "demo"])
def test_existing_output_needs_overwrite(root, capsys, cmd):
    if cmd == "data-synth":
        argv = ["data", "synth", "--people", "2", "--out", "{out}"]
    elif cmd == "demo":
        argv = ["demo", "--preset", "mini", "--out", "{out}"]
    else:
        argv = COMMANDS[cmd][0]
    out = root / ("done.json" if cmd == "eval" else "done")
    before = _snapshot(root)
    assert main([a.format(r=root, out=out) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"{out} exists" in err and "--overwrite" in err, err
    assert _snapshot(root) == before


@pytest.mark.parametrize("cmd", ["unlearn-full", "pretrain-init", "quantize", "survival", "eval", "data-synth"])
def test_output_below_a_file_is_refused_early(root, capsys, cmd):
    argv = ["data", "synth", "--out", "{out}"] if cmd == "data-synth" else COMMANDS[cmd][0]
    out = root / "done.json" / "sub"
    assert main([a.format(r=root, out=out) for a in argv]) == 2
    assert "done.json is a file" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["unlearn-full", "pretrain-init", "eval"])
def test_bad_device_is_refused_early(root, capsys, tmp_path, cmd):
    argv = [a.format(r=root, out=tmp_path / ("o.json" if cmd == "eval" else "o")) for a in COMMANDS[cmd][0]]
    assert main(argv + ["--device", "bogus"]) == 2
    assert "'bogus' is not a valid device" in capsys.readouterr().err
    assert not os.listdir(tmp_path)

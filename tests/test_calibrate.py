"""qru.kernels.calibrate: per-machine choices, measured once, cached per machine, overridable."""
import json
import re

import pytest
import torch

from qru import io
from qru.kernels import calibrate
from qru.kernels._backend import load_cpp_ext
from calib_helpers import fake_choice


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A private cache directory and a fake probe for dense_fp32 whose timings the test sets."""
    yield fake_choice(monkeypatch, tmp_path, "dense_fp32", "QRU_DENSE_FP32", {"torch": 0.010, "onednn": 0.005})
    calibrate.clear_memo()


def test_pick_follows_the_measurement_with_a_margin(fake):
    assert calibrate.measure("dense_fp32").pick == "onednn"  # 2x faster
    fake["secs"] = {"torch": 0.010, "onednn": 0.0098}  # 2% faster: not worth leaving the default
    d = calibrate.measure("dense_fp32")
    assert d.pick == "torch" and "not at least 5%" in d.why
    fake["secs"] = {"torch": 0.010, "onednn": 0.020}
    assert calibrate.measure("dense_fp32").pick == "torch"


def test_cache_is_written_once_and_then_used(fake, tmp_path):
    d1 = calibrate.decide("dense_fp32", threads=1)
    assert (d1.source, d1.pick, fake["calls"]) == ("measured", "onednn", 1)
    path = calibrate.cache_path(threads=1)
    assert path.parent == tmp_path / "calibration"
    data = json.loads(path.read_text())
    assert data["version"] == calibrate.CACHE_VERSION and data["choices"]["dense_fp32"]["pick"] == "onednn"
    assert data["machine"]["threads"] == "1" and data["machine"]["torch"] == torch.__version__
    calibrate.clear_memo()
    fake["secs"] = {"torch": 0.001, "onednn": 0.010}  # would flip the pick if it were measured again
    d2 = calibrate.decide("dense_fp32", threads=1)
    assert (d2.source, d2.pick, fake["calls"]) == ("cache", "onednn", 1)
    d3 = calibrate.decide("dense_fp32", threads=1, recalibrate=True)
    assert (d3.source, d3.pick, fake["calls"]) == ("measured", "torch", 2)


def test_cache_write_is_atomic_and_not_a_fault_point(fake, tmp_path, monkeypatch):
    """The cache goes through qru.io's atomic write (no temp file left) but is not a numbered fault
    point: whether it is written depends on earlier runs, and kill tests number a command's points."""
    log = tmp_path / "faults.log"
    monkeypatch.setenv(io.FAULT_LOG_ENV, str(log))
    calibrate.decide("dense_fp32", threads=1)
    path = calibrate.cache_path(threads=1)
    assert json.loads(path.read_text())["choices"]["dense_fp32"]["pick"] == "onednn"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert not log.exists()
    io.write_text(tmp_path / "out.txt", "x")  # an output is a numbered point
    (line,) = log.read_text().splitlines()
    assert line.split(" ", 1)[1] == f"write {tmp_path / 'out.txt'}"


def test_thread_counts_are_cached_apart(fake):
    assert calibrate.cache_path(threads=1) != calibrate.cache_path(threads=2)
    calibrate.decide("dense_fp32", threads=1)
    calibrate.decide("dense_fp32", threads=2)
    assert fake["calls"] == 2


@pytest.mark.parametrize("stale", ["version", "key", "garbage"])
def test_stale_cache_is_measured_again(fake, stale):
    calibrate.decide("dense_fp32", threads=1)
    path = calibrate.cache_path(threads=1)
    data = json.loads(path.read_text())
    if stale == "garbage":
        path.write_text("{not json")
    else:
        data[stale] = "other"  # another schema version, or a file copied from another machine
        path.write_text(json.dumps(data))
    calibrate.clear_memo()
    fake["secs"] = {"torch": 0.001, "onednn": 0.010}
    d = calibrate.decide("dense_fp32", threads=1)
    assert (d.source, d.pick, fake["calls"]) == ("measured", "torch", 2)
    assert json.loads(path.read_text())["version"] == calibrate.CACHE_VERSION


def test_a_measurement_taken_while_busy_is_redone_when_idle(fake):
    fake["others"] = 1  # another job holds one of the two cores: the probe may be skewed
    d1 = calibrate.decide("dense_fp32", threads=2)
    assert (d1.pick, fake["calls"]) == ("onednn", 1) and d1.why.startswith("measured busy:")
    path = calibrate.cache_path(threads=2)
    assert json.loads(path.read_text())["choices"]["dense_fp32"]["load"] == "busy"
    calibrate.clear_memo()
    assert calibrate.decide("dense_fp32", threads=2).source == "cache"  # still busy: the cache serves
    calibrate.clear_memo()
    fake["others"] = 0
    fake["secs"] = {"torch": 0.001, "onednn": 0.010}
    d2 = calibrate.decide("dense_fp32", threads=2)  # idle now: measured again, and kept for good
    assert (d2.source, d2.pick, fake["calls"]) == ("measured", "torch", 2)
    assert json.loads(path.read_text())["choices"]["dense_fp32"]["load"] == "idle"
    calibrate.clear_memo()
    fake["others"] = 1
    assert (calibrate.decide("dense_fp32", threads=2).source, fake["calls"]) == ("cache", 2)


def test_override_wins_over_cache_and_measurement(fake, monkeypatch):
    calibrate.decide("dense_fp32", threads=1)  # cached: onednn
    monkeypatch.setenv("QRU_DENSE_FP32", "torch")
    d = calibrate.decide("dense_fp32", threads=1)
    assert (d.source, d.pick) == ("override", "torch") and fake["calls"] == 1
    monkeypatch.setenv("QRU_DENSE_FP32", "mkl")
    with pytest.raises(ValueError, match="QRU_DENSE_FP32='mkl' is not one of onednn, torch"):
        calibrate.decide("dense_fp32")


def test_dispatch_follows_the_pick(fake, monkeypatch, one_thread):
    from qru.kernels.dense import onednn_available, use_onednn

    x, w = torch.randn(5, 8), torch.randn(3, 8)
    assert use_onednn(x, w) == onednn_available()  # fake probe: onednn 2x faster
    calibrate.clear_memo()
    calibrate.decide("dense_fp32", recalibrate=True)  # flip by a new measurement
    fake["secs"] = {"torch": 0.001, "onednn": 0.010}
    calibrate.decide("dense_fp32", recalibrate=True)
    assert not use_onednn(x, w)


def test_real_probes_time_both_candidates(monkeypatch, tmp_path, one_thread):
    if not calibrate.onednn_available():
        pytest.skip("this torch build has no oneDNN")
    for choice in ("dense_fp32", "packed_fp32", "packed_bf16"):
        if not calibrate.CHOICES[choice][3]():
            continue  # packed_bf16: no native bf16 on this CPU
        d = calibrate.measure(choice)
        assert set(d.seconds) == {"onednn", "torch"} and all(s > 0 for s in d.seconds.values())
        assert d.pick in ("onednn", "torch")


def test_unknown_choice_is_named():
    with pytest.raises(ValueError, match="unknown calibration choice 'gemm'"):
        calibrate.decide("gemm")


def test_doctor_prints_machine_choices_and_cache(fake, capsys):
    from qru.cli import main
    from qru.kernels import machine

    assert main(["doctor", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    m = machine.describe()
    assert m["cpu_model"] in out and f"ISA level {m['isa']}" in out
    assert str(calibrate.cache_root()) in out and calibrate.cache_path(1).name in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if " -> " in ln}
    assert set(lines) == set(calibrate.CHOICES)  # one thread: no load states
    assert re.search(r"dense_fp32 +-> onednn +\[measured\] measured idle: onednn 5.0 ms vs torch 10.0 ms", lines["dense_fp32"])
    # one column each for the arrows, the picks and the sources, whatever the names' lengths
    assert len({ln.index(" -> ") for ln in lines.values()}) == 1
    assert len({ln.index(" [") for ln in lines.values()}) == 1
    calibrate.clear_memo()
    assert main(["doctor", "--threads", "1"]) == 0  # a new process: from the cache
    assert re.search(r"dense_fp32 +-> onednn +\[cache\]", capsys.readouterr().out)
    assert main(["doctor", "--threads", "0"]) == 2


def test_doctor_shows_the_thread_rule_per_load_state(monkeypatch, tmp_path, capsys):
    from qru.cli import main

    fake = fake_choice(monkeypatch, tmp_path, "kernel_threads", "QRU_KERNEL_THREADS",
                       {"all": 0.010, "adaptive": 0.012, "one": 0.008})
    fake["others"] = 1
    assert main(["doctor", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "the machine is busy now" in out
    if load_cpp_ext("quant") is not None:  # where the parallel loops run: a reading of the real machine
        assert re.search(r"parallel C\+\+ loops now on: (OpenMP \(torch's pool\)|qru::Team) \(other processes' "
                         r"runnable tasks: \d+; usable cores: \d+\)", out)
        monkeypatch.setenv("QRU_CPU_POOL", "team")
        assert main(["doctor", "--threads", "2"]) == 0
        assert "parallel C++ loops now on: qru::Team" in capsys.readouterr().out
        monkeypatch.delenv("QRU_CPU_POOL")
    assert re.search(r"kernel_threads@busy +-> one +\[measured\] measured busy: one 8.0 ms", out)
    assert re.search(r"kernel_threads@idle +-> \? +\[not measured\] the first kernel call while the machine is idle", out)
    lines = [ln for ln in out.splitlines() if " -> " in ln]
    assert len(lines) == len(calibrate.CHOICES) + 1 and len({ln.index(" -> ") for ln in lines}) == 1
    fake["others"] = 0
    calibrate.clear_memo()
    assert main(["doctor", "--threads", "2", "--recalibrate"]) == 0  # measures the present state only
    out = capsys.readouterr().out
    assert re.search(r"kernel_threads@busy +-> one +\[cache\]", out)
    assert re.search(r"kernel_threads@idle +-> one +\[measured\] measured idle", out)
    calibrate.clear_memo()


def test_real_thread_probe_times_the_three_rules(monkeypatch):
    from qru.kernels._backend import load_cpp_ext

    if load_cpp_ext("quant") is None:
        pytest.skip("no C++ compiler")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        d = calibrate.measure("kernel_threads")
    finally:
        torch.set_num_threads(n)
    assert set(d.seconds) == {"all", "adaptive", "one"} and all(s > 0 for s in d.seconds.values())
    assert d.pick in ("all", "adaptive", "one")

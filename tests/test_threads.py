"""qru.kernels.threads: the busy-machine thread rule of the OpenMP kernels (calibrated, cached,
overridable) and results that do not depend on the team size."""
import json

import pytest
import torch

from qru.kernels import calibrate, fake_quant, machine, quant4, quant_gguf, quant_int, threads
from qru.kernels._backend import load_cpp_ext
from calib_helpers import fake_choice


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A private cache and a fake kernel_threads probe whose timings the test sets."""
    yield fake_choice(monkeypatch, tmp_path, "kernel_threads", "QRU_KERNEL_THREADS", {"all": 0.010, "adaptive": 0.030, "one": 0.0098})
    calibrate.clear_memo()


def test_parse_loadavg_reads_the_runnable_count():
    assert machine.parse_loadavg("9.05 6.01 3.11 12/167 29277\n") == 12
    with pytest.raises(ValueError, match="/proc/loadavg"):
        machine.parse_loadavg("garbage")


def test_others_running_is_the_runnable_count_less_this_process_s_own(monkeypatch):
    monkeypatch.setattr(machine, "parse_loadavg", lambda text: 5)
    monkeypatch.setattr(machine, "own_runnable_threads", lambda: 1)  # the reader
    assert machine.others_running() == 4
    monkeypatch.setattr(machine, "own_runnable_threads", lambda: 3)  # and two spinning OpenMP workers
    assert machine.others_running() == 2
    monkeypatch.setattr(machine, "parse_loadavg", lambda text: 1)
    assert machine.others_running() == 0


def _busy_thread_while(check):
    """Run ``check()`` while another thread of this process computes without the GIL (sha256 of
    64 MB, repeated), and return what it returned."""
    import hashlib
    import threading

    data, stop = b"x" * (64 << 20), threading.Event()

    def spin():
        while not stop.is_set():
            hashlib.sha256(data).digest()  # releases the GIL: the thread is running (R) meanwhile

    t = threading.Thread(target=spin)
    t.start()
    try:
        return check()
    finally:
        stop.set()
        t.join()


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs /proc")
def test_own_runnable_threads_counts_the_reader_and_a_computing_thread():
    assert machine.own_runnable_threads() >= 1  # the reader is running
    seen = _busy_thread_while(lambda: max(machine.own_runnable_threads() for _ in range(50)))
    assert seen >= 2


def _busy_processes(n):
    import subprocess
    import sys

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.skipif(load_cpp_ext("quant") is None, reason="no C++ compiler")
def test_cpu_pool_joins_openmp_only_when_other_processes_leave_the_cores(monkeypatch):
    import time

    monkeypatch.delenv("QRU_CPU_POOL", raising=False)
    cores = threads.cpu_pool(2)["cores"]
    assert threads.cpu_pool(1)["pool"] == "serial"
    monkeypatch.setenv("QRU_CPU_POOL", "omp")
    assert threads.cpu_pool(2)["pool"] == "omp"
    monkeypatch.setenv("QRU_CPU_POOL", "team")
    assert threads.cpu_pool(2)["pool"] == "team"
    monkeypatch.setenv("QRU_CPU_POOL", "spin")
    with pytest.raises(RuntimeError, match="QRU_CPU_POOL must be auto, omp or team, got 'spin'"):
        threads.cpu_pool(2)
    monkeypatch.delenv("QRU_CPU_POOL")
    # more threads than cores: never OpenMP (a region would wait for a thread with no core)
    assert threads.cpu_pool(cores + 1)["pool"] == "team"
    # other processes on every core but one: a 2-thread loop must not wait for them, so the Team;
    # the reading is refreshed in the background within ~10 ms of a call
    procs = _busy_processes(cores - 1)
    try:
        got = []
        for _ in range(100):
            got.append(threads.cpu_pool(2))
            if got[-1]["pool"] == "team" and got[-1]["others"] >= cores - 1:
                break
            time.sleep(0.01)
        assert got[-1]["pool"] == "team" and got[-1]["others"] >= cores - 1, got[-5:]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # a computing thread of this process is not another process: the count leaves it out, like the reader
    def others_stay_low():
        time.sleep(0.05)
        return [threads.cpu_pool(2)["others"] for _ in range(3)] + [machine.others_running()]
    assert min(_busy_thread_while(others_stay_low)) <= max(0, cores - 2)


@pytest.mark.skipif(load_cpp_ext("quant") is None, reason="no C++ compiler")
def test_calibrate_reads_the_load_from_the_cpp_reader_once_loaded(monkeypatch):
    class Ext:  # a loaded quant extension whose background reading says `value`
        def __init__(self, value):
            self.value = value

        def others_running(self):
            return self.value

    load_cpp_ext("quant")
    assert calibrate.loaded_cpp_ext("quant") is not None  # loaded: the reading comes from C++
    monkeypatch.setattr(calibrate, "loaded_cpp_ext", lambda name: Ext(7))
    assert calibrate.others_running() == 7
    monkeypatch.setattr(calibrate, "loaded_cpp_ext", lambda name: Ext(-1))
    assert calibrate.others_running() is None  # unknown
    monkeypatch.setattr(calibrate, "loaded_cpp_ext", lambda name: None)  # no kernels: /proc, from Python
    monkeypatch.setattr(calibrate.machine, "others_running", lambda: 3)
    assert calibrate.others_running() == 3


def test_kernel_threads_works_the_rule_out_once_per_load_reading(fake, monkeypatch):
    calls = []
    real = calibrate.pick
    monkeypatch.setattr(calibrate, "pick", lambda choice: calls.append(choice) or real(choice))
    monkeypatch.setattr(calibrate, "LOAD_SAMPLE_S", 60.0)
    calibrate.clear_memo()
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ks = [threads.kernel_threads(1 << 20) for _ in range(50)]
        assert ks == [2] * 50 and len(calls) == 1  # the probe says "all": 2 threads, worked out once
        monkeypatch.setenv("QRU_KERNEL_THREADS", "one")  # an override takes effect on the next call
        assert threads.kernel_threads(1 << 20) == 1 and len(calls) == 2
        monkeypatch.delenv("QRU_KERNEL_THREADS")
        fake["others"] = 1  # a new reading: worked out again (another job holds a core)
        monkeypatch.setattr(calibrate, "LOAD_SAMPLE_S", -1.0)
        fake["secs"] = {"all": 0.010, "adaptive": 0.001, "one": 0.0098}
        assert threads.kernel_threads(1 << 20) == 1 and len(calls) == 3
    finally:
        torch.set_num_threads(n)


def test_free_cores_and_load_state_follow_the_other_runnable_tasks(fake):
    for others, free, state2, state1 in ((0, 2, "idle", "idle"), (1, 1, "busy", "idle"), (2, 1, "busy", "busy"),
                                         (9, 1, "busy", "busy"), (None, 2, "idle", "idle")):  # None: unknown
        fake["others"] = others
        assert calibrate.recent_free_cores() == free
        assert (calibrate.load_state(2), calibrate.load_state(1)) == (state2, state1)


def test_the_load_is_read_at_most_once_per_sample_period(monkeypatch):
    reads = []
    monkeypatch.setattr(calibrate, "others_running", lambda: reads.append(1) or 0)
    monkeypatch.setattr(calibrate, "LOAD_SAMPLE_S", 60.0)
    calibrate.clear_memo()
    for _ in range(100):
        calibrate.load_state(2), calibrate.rule_threads("adaptive", 2)
    assert len(reads) == 1
    monkeypatch.setattr(calibrate, "LOAD_SAMPLE_S", -1.0)  # every call reads
    calibrate.load_state(2)
    assert len(reads) == 2
    calibrate.clear_memo()


def test_rules_give_their_thread_counts(fake, monkeypatch):
    fake["others"] = 1  # another job holds one of two cores
    assert [calibrate.rule_threads(r, 2) for r in ("adaptive", "all", "one")] == [1, 2, 1]
    fake["others"] = 0
    monkeypatch.setattr(calibrate, "usable_cores", lambda: 8)
    assert [calibrate.rule_threads(r, 4) for r in ("adaptive", "all", "one")] == [4, 4, 1]
    assert calibrate.rule_threads("all", 1) == 1
    with pytest.raises(ValueError, match="unknown thread rule 'spin'"):
        calibrate.rule_threads("spin", 2)


def test_pick_keeps_all_unless_another_rule_is_clearly_faster(fake):
    d = calibrate.measure("kernel_threads")  # one is 2% faster, adaptive 3x slower
    assert d.pick == "all" and "not at least 5%" in d.why and "adaptive 30.0 ms" in d.why
    fake["secs"] = {"all": 0.010, "adaptive": 0.005, "one": 0.011}
    assert calibrate.measure("kernel_threads").pick == "adaptive"
    fake["secs"] = {"all": 0.010, "adaptive": 0.012, "one": 0.008}
    d = calibrate.measure("kernel_threads")
    assert d.pick == "one" and d.why.startswith("one 8.0 ms vs all 10.0 ms vs adaptive 12.0 ms")


def test_kernel_threads_choice_is_cached_then_used_and_recalibrated(fake):
    fake["secs"] = {"all": 0.010, "adaptive": 0.012, "one": 0.008}
    d1 = calibrate.decide("kernel_threads", threads=2)
    assert (d1.source, d1.pick, fake["calls"]) == ("measured", "one", 1)
    assert d1.why.startswith("measured idle: one 8.0 ms")
    data = json.loads(calibrate.cache_path(threads=2).read_text())
    assert data["choices"]["kernel_threads@idle"]["pick"] == "one"
    calibrate.clear_memo()
    fake["secs"] = {"all": 0.010, "adaptive": 0.005, "one": 0.011}  # would flip it if measured
    d2 = calibrate.decide("kernel_threads", threads=2)
    assert (d2.source, d2.pick, fake["calls"]) == ("cache", "one", 1)
    d3 = calibrate.decide("kernel_threads", threads=2, recalibrate=True)
    assert (d3.source, d3.pick, fake["calls"]) == ("measured", "adaptive", 2)


def test_a_rule_measured_busy_is_not_kept_on_an_idle_machine(fake):
    """The defect this guards against: 'one' calibrated while another job held a core, then kept
    (from the cache) on the idle machine, where all threads are faster."""
    fake["others"] = 1  # busy: one thread wins
    fake["secs"] = {"all": 0.0076, "adaptive": 0.0046, "one": 0.0041}
    d = calibrate.decide("kernel_threads", threads=2)
    assert (d.pick, d.why[:14]) == ("one", "measured busy:")
    calls = fake["calls"]
    fake["others"] = 0  # idle: all threads win, and the busy pick is not used
    fake["secs"] = {"all": 0.0027, "adaptive": 0.0029, "one": 0.0038}
    d = calibrate.decide("kernel_threads", threads=2)
    assert (d.source, d.pick, fake["calls"]) == ("measured", "all", calls + 1)
    data = json.loads(calibrate.cache_path(threads=2).read_text())
    assert {k: v["pick"] for k, v in data["choices"].items()} == {"kernel_threads@busy": "one",
                                                                  "kernel_threads@idle": "all"}
    calibrate.clear_memo()  # a new process: both states from the cache, each in its own state
    fake["others"] = 1
    assert calibrate.decide("kernel_threads", threads=2).pick == "one"
    fake["others"] = 0
    assert calibrate.decide("kernel_threads", threads=2).pick == "all"
    assert fake["calls"] == calls + 1


def test_pick_follows_the_load_state_call_by_call(fake):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fake["secs"] = {"all": 0.0076, "adaptive": 0.0046, "one": 0.0041}
        fake["others"] = 1
        assert calibrate.pick("kernel_threads") == "one"
        assert threads.kernel_threads(1 << 20) == 1
        fake["secs"] = {"all": 0.0027, "adaptive": 0.0029, "one": 0.0038}
        fake["others"] = 0
        assert calibrate.pick("kernel_threads") == "all"
        assert threads.kernel_threads(1 << 20) == 2
        fake["others"] = 1
        assert calibrate.pick("kernel_threads") == "one"  # memoised per state: no new probe
        assert fake["calls"] == 2
    finally:
        torch.set_num_threads(n)


def test_a_probe_during_which_the_load_changed_is_not_cached(fake):
    fake["during"] = lambda: fake.update(others=1)  # another job starts during the probe
    d = calibrate.decide("kernel_threads", threads=2)
    assert d.source == "measured" and "not cached" in d.why
    assert not calibrate.cache_path(threads=2).exists()
    assert calibrate.decide("kernel_threads", threads=2, load="idle") is d  # this process keeps it


def test_the_other_state_is_never_measured(fake):
    fake["others"] = 1
    assert calibrate.decide("kernel_threads", threads=2, load="idle") is None
    assert fake["calls"] == 0
    with pytest.raises(ValueError, match="unknown load state 'calm'"):
        calibrate.decide("kernel_threads", threads=2, load="calm")
    d = calibrate.decide("kernel_threads", threads=1)  # one thread: no rule, no load state
    assert (d.source, d.pick, fake["calls"]) == ("unavailable", "all", 0)


def test_stale_kernel_threads_cache_is_measured_again(fake):
    calibrate.decide("kernel_threads", threads=2)
    path = calibrate.cache_path(threads=2)
    data = json.loads(path.read_text())
    data["key"] = "another machine"
    path.write_text(json.dumps(data))
    calibrate.clear_memo()
    fake["secs"] = {"all": 0.010, "adaptive": 0.012, "one": 0.008}
    d = calibrate.decide("kernel_threads", threads=2)
    assert (d.source, d.pick, fake["calls"]) == ("measured", "one", 2)


def test_override_wins_and_a_bad_value_is_named(fake, monkeypatch):
    calibrate.decide("kernel_threads", threads=2)  # cached: all
    monkeypatch.setenv("QRU_KERNEL_THREADS", "one")
    d = calibrate.decide("kernel_threads", threads=2)
    assert (d.source, d.pick, fake["calls"]) == ("override", "one", 1)
    monkeypatch.setenv("QRU_KERNEL_THREADS", "two")
    with pytest.raises(ValueError, match="QRU_KERNEL_THREADS='two' is not one of all, adaptive, one"):
        calibrate.decide("kernel_threads", threads=2)


def test_kernel_team_sets_and_restores_torch_threads(fake, monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setenv("QRU_KERNEL_THREADS", "one")
        with threads.kernel_team(1 << 20) as k:
            assert k == 1 == torch.get_num_threads()
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), threads.kernel_team(1 << 20):
            raise RuntimeError("kernel failed")
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("QRU_KERNEL_THREADS", "all")
        assert threads.kernel_threads(1 << 20) == 2
        assert threads.kernel_threads(threads.SMALL - 1) == 1  # small work: one thread
        assert fake["calls"] == 0  # overridden: never measured
    finally:
        torch.set_num_threads(n)



def test_with_kernel_team_runs_at_the_rule_s_count_and_restores(fake, monkeypatch):
    seen = []

    @threads.with_kernel_team(lambda work: work)
    def kernel(work):
        seen.append(torch.get_num_threads())
        if work < 0:
            raise RuntimeError("kernel failed")
        return work

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setenv("QRU_KERNEL_THREADS", "one")
        assert kernel(1 << 20) == 1 << 20 and seen[-1] == 1 and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            kernel(-(1 << 20))
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("QRU_KERNEL_THREADS", "all")
        kernel(1 << 20)
        kernel(threads.SMALL - 1)
        assert seen[-2:] == [2, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)

def _quant_outputs(w):
    n = w.numel()
    out = {}
    p, a = quant4.quantize_4bit(w, "nf4", 64)
    out["nf4"] = (p, a, quant4.dequantize_4bit(p, a, "nf4", 64, n, torch.bfloat16))
    d, s, z = quant_int.quantize_int(w, "int4", 128)
    out["int4"] = (d, s, z, quant_int.dequantize_int(d, s, z, "int4", tuple(w.shape), 128, torch.float32))
    g = quant_gguf.quantize_gguf(w, "q4_k")
    out["q4_k"] = (g, quant_gguf.dequantize_gguf(g, "q4_k", n, torch.bfloat16))
    out["fake_q4_0"] = (fake_quant.fake_quant_values(w, "q4_0"),)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], 4, generator=g) * 0.1
    out["fake_int4_lora"] = (fake_quant.fake_quant_values(w, "int4", 128, lora=(a, b, 0.5)),)
    return out


@pytest.mark.skipif(load_cpp_ext("quant") is None, reason="no C++ compiler")
def test_results_are_bit_identical_whatever_the_thread_count(monkeypatch):
    w = (torch.randn(384, 1024, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    assert w.numel() >= threads.SMALL  # large enough to run on a team
    n = torch.get_num_threads()
    runs = {}
    try:
        for t, rule in ((1, "all"), (2, "all"), (2, "one"), (2, "adaptive"), (3, "all")):
            torch.set_num_threads(t)
            monkeypatch.setenv("QRU_KERNEL_THREADS", rule)
            runs[(t, rule)] = _quant_outputs(w)
    finally:
        torch.set_num_threads(n)
    base = runs.pop((1, "all"))
    # the oracle: the pure-torch references give the same codes and scales
    p, a = quant4.quantize_4bit_reference(w, "nf4", 64)
    assert torch.equal(p, base["nf4"][0]) and torch.equal(a, base["nf4"][1])
    assert torch.equal(quant_gguf.quantize_gguf_reference(w, "q4_k"), base["q4_k"][0])
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], 4, generator=g) * 0.1
    merged = fake_quant.merge_reference(w, a, b, 0.5)
    ref = fake_quant.fake_quant_reference(merged, "int4", 128, torch.bfloat16)
    assert torch.equal(ref, base["fake_int4_lora"][0])
    for key, out in runs.items():
        for fmt, tensors in out.items():
            for i, (x, y) in enumerate(zip(base[fmt], tensors)):
                assert (x is None and y is None) or torch.equal(x, y), f"{fmt}[{i}] differs at {key}"

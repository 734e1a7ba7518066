"""The C++ build: every kernel in qru/csrc builds where a toolchain exists (a failed build fails
here, it is not "no compiler"), a failed build falls back with a one-line warning naming its file,
the cache key carries the CPU and the checkout, and a stale torch ``lock`` does not hang a build."""
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from cpp_helpers import need_cpp
from qru.kernels import _backend, machine

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted(p.stem for p in _backend.CSRC.glob("*.cpp"))


def test_csrc_is_inside_the_package():
    """The sources ship with the package (qru/csrc, package data), so non-editable installs keep them."""
    assert _backend.CSRC == ROOT / "qru" / "csrc"
    assert {"llama_ops", "quant", "lora", "qmatmul"} <= set(KERNELS)
    assert (_backend.CSRC / "qru_common.h").is_file()


@pytest.mark.parametrize("name", KERNELS)
def test_every_kernel_builds(name):
    """Each qru/csrc/*.cpp builds and registers torch.ops.qru_<name> (skipped only without a toolchain)."""
    ext = need_cpp(name)
    assert ext is getattr(torch.ops, f"qru_{name}") and _backend.build_error(name) is None
    assert _backend.build_dir(name).name == _backend.ext_name(name)


def test_ext_name_carries_isa_cpu_flags_and_checkout(monkeypatch, tmp_path):
    here = _backend.ext_name("lora")
    assert here.startswith(f"qru_lora_{machine.isa_level()}_")
    monkeypatch.setattr(_backend, "CSRC", tmp_path / "other-checkout" / "qru" / "csrc")
    other_checkout = _backend.ext_name("lora")
    monkeypatch.undo()
    flags = machine.cpu_flags() | {"avx512_fp16_fictional"}
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    other_cpu = _backend.ext_name("lora")
    monkeypatch.undo()
    monkeypatch.setattr(machine, "isa_level", lambda flags=None: "baseline")
    lower_isa = _backend.ext_name("lora")
    assert len({here, other_checkout, other_cpu}) == 3
    assert lower_isa.startswith("qru_lora_baseline_")


def _toolchain():
    missing = _backend.missing_toolchain()
    if missing is not None:
        pytest.skip(f"no {missing}")


def test_failed_build_warns_once_names_file_and_is_not_no_compiler(monkeypatch, tmp_path):
    """A source that does not compile: load_cpp_ext returns None with one warning line naming the
    file and the compiler's error; build_error says why; need_cpp fails (does not skip)."""
    _toolchain()
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "broken_kernel.cpp").write_text('#error "qru-test: this kernel does not compile"\n')
    monkeypatch.setattr(_backend, "CSRC", csrc)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _backend.load_cpp_ext.__wrapped__("broken_kernel") is None
    msgs = [str(x.message) for x in w if "qru:" in str(x.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert "broken_kernel.cpp failed to build" in msgs[0] and "qru-test: this kernel does not compile" in msgs[0]
    assert "qru-test" in _backend.build_error("broken_kernel")
    monkeypatch.setattr(_backend, "load_cpp_ext", _backend.load_cpp_ext.__wrapped__)
    assert _backend.backend_for(torch.zeros(1), cpp="broken_kernel") == "torch"  # the run-time fallback
    monkeypatch.setenv("QRU_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="broken_kernel"):
        _backend.backend_for(torch.zeros(1), cpp="broken_kernel")
    import cpp_helpers

    monkeypatch.setattr(cpp_helpers, "load_cpp_ext", _backend.load_cpp_ext)
    with pytest.raises(pytest.fail.Exception, match="broken_kernel.cpp failed to build"):
        cpp_helpers.need_cpp("broken_kernel")


def test_no_toolchain_is_not_a_build_failure(monkeypatch, tmp_path):
    """Without a compiler: a warning that says so, no build error recorded, and need_cpp skips."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert "no-such-c++" in _backend.missing_toolchain()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _backend.load_cpp_ext.__wrapped__("token_stats_not_built") is None
    assert any("no C++ compiler" in str(x.message) and "token_stats_not_built.cpp" in str(x.message) for x in w)
    assert _backend.build_error("token_stats_not_built") is None
    import cpp_helpers

    monkeypatch.setattr(cpp_helpers, "load_cpp_ext", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="no C\\+\\+ compiler"):
        cpp_helpers.need_cpp("token_stats")


_HOLDER = """
import fcntl, os, sys, time
d = sys.argv[1]
f = open(os.path.join(d, "qru.flock"), "a")
fcntl.flock(f, fcntl.LOCK_EX)
open(os.path.join(d, "lock"), "w").close()  # what torch's FileBaton creates while it builds
print("holding", flush=True)
time.sleep(600)
"""


def test_lock_of_a_live_builder_is_kept_and_of_a_killed_one_removed(tmp_path):
    """A builder holds the flock and torch's ``lock``: a second builder waits (the lock stays); once
    the first is killed (SIGKILL, as a killed build), the second removes the stale lock and goes on."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        entered = threading.Event()

        def second():
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                with _backend.builder_lock(tmp_path):
                    entered.set()

        t = threading.Thread(target=second, daemon=True)
        t.start()
        time.sleep(1.0)
        assert not entered.is_set() and (tmp_path / "lock").exists()  # a live builder: wait
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert entered.wait(timeout=30)
        t.join(timeout=30)
        assert not (tmp_path / "lock").exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_stale_lock_does_not_hang_a_real_build(tmp_path):
    """A torch ``lock`` left in a built extension's directory: a fresh process removes it with a
    warning and loads the kernel (torch alone would wait on it forever)."""
    need_cpp("token_stats")
    lock = _backend.build_dir("token_stats") / "lock"
    lock.touch()
    code = ("import sys; from qru.kernels._backend import load_cpp_ext; "
            "sys.exit(0 if load_cpp_ext('token_stats') is not None else 3)")
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        stale = lock.exists()
        lock.unlink(missing_ok=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not stale and "stale build lock" in r.stderr


def test_every_shared_header_is_in_the_build_tag(monkeypatch, tmp_path):
    """torch versions a JIT build by its sources, not the headers they include: the flags carry a hash
    of every qru/csrc/*.h, so editing any of them (qru_common.h, gguf_blocks.h) rebuilds."""
    assert {"qru_common.h", "gguf_blocks.h"} <= {p.name for p in _backend.CSRC.glob("*.h")}
    for f in _backend.CSRC.glob("*.h"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(_backend, "CSRC", tmp_path)
    tags = {_backend._common_header_tag()}
    for name in ("qru_common.h", "gguf_blocks.h"):
        (tmp_path / name).write_text((tmp_path / name).read_text() + "\n// edited\n")
        tags.add(_backend._common_header_tag())
    assert len(tags) == 3

"""The demo's stage cache (qru.demo.stages): cached results, and two processes on one stage root (a build in
progress belongs to its process; prune removes only dead processes' leftovers)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qru.demo.stages import StageCache

REPO = Path(__file__).resolve().parents[1]

# a second process: builds stage "slow" until the file `go` appears, then commits it
SLOW = """
import sys, time
from pathlib import Path
from qru.demo.stages import StageCache
root = Path(sys.argv[1])
def build(d):
    (root / "started").write_text(str(d))
    while not (root / "go").exists():
        time.sleep(0.05)
    (d / "data.txt").write_text("slow")
    return {"v": 2}
st = StageCache(root, log=lambda m: None).run("slow", {"k": 1}, build)
print(st.dir)
"""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_cached_result_and_cpu_seconds(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        (d / "x.txt").write_text("x")
        return {"n": 1}

    a = StageCache(tmp_path, log=lambda m: None).run("s", {"k": 1}, build)
    b = StageCache(tmp_path, log=lambda m: None).run("s", {"k": 1}, build)
    assert len(calls) == 1 and not a.cached and b.cached and b.dir == a.dir and b.result == {"n": 1}
    man = json.loads((a.dir / "manifest.json").read_text())
    assert man["cpu_seconds"] >= 0 and b.cpu_seconds == man["cpu_seconds"]
    assert not calls[0].exists() and (a.dir / "x.txt").read_text() == "x"  # built beside, renamed into place


def test_prune_keeps_a_live_process_build(tmp_path):
    root = tmp_path / "stages"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    other = subprocess.Popen([sys.executable, "-c", SLOW, str(root)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if (root / "started").exists():
                break
            time.sleep(0.05)
        partial = Path((root / "started").read_text())
        assert partial.is_dir() and str(other.pid) in partial.name
        # this process: the same stage name with other settings, another stage, and dead processes' leftovers
        dead = _dead_pid()
        leftovers = [root / f".slow-0123456789ab.{dead}.deadbeef.partial",  # this version's build
                     root / f".s-0123456789ab.tmp-{dead}-deadbeef"]  # an earlier version's
        for p in leftovers:
            p.mkdir()
        cache = StageCache(root, log=lambda m: None)
        mine = cache.run("slow", {"k": 0}, lambda d: {"v": 1})
        cache.run("s", {"k": 1}, lambda d: {})
        removed = cache.prune()
        assert partial.is_dir(), "prune removed the build of a live process"
        assert sorted(removed) == sorted(leftovers) and not any(p.exists() for p in leftovers)
        (root / "go").write_text("")
        out, _ = other.communicate(timeout=60)
        assert other.returncode == 0
        theirs = Path(out.strip().splitlines()[-1])
        assert (theirs / "data.txt").read_text() == "slow" and theirs != mine.dir and mine.dir.is_dir()
        # the next prune by this process removes the other settings' stage of a name it used, not its own
        assert cache.prune() == [theirs] and mine.dir.is_dir()
    finally:
        if other.poll() is None:
            other.kill()

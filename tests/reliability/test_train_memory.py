"""Training memory stays flat: the resident set after 4N steps is no larger than after N steps,
up to a tolerance far below the growth the unbucketed GEMM shapes caused (oneDNN caching a
~0.7 MB primitive per new batch width / target-row count: +140 MB between steps 21 and 87 of
this run before the fix, +0.3 MB after, on the 2-core development VM)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qru.train.losses import padded_rows

ROOT = Path(__file__).resolve().parents[2]
TOL_MB = 60

SCRIPT = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from pathlib import Path
import torch
torch.set_num_threads(1)
from qru.train import distributed as T  # the loop collates each batch through rank_batch
from qru.train.config import UnlearnConfig
from qru.train.unlearn import unlearn
out, model, forget, retain, cache = sys.argv[2:7]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
seen = []
orig = T.collate
def collate(*a, **k):
    seen.append(rss())
    return orig(*a, **k)
T.collate = collate
unlearn(UnlearnConfig(out=out, model=model, forget=[forget], retain=[retain], method="npo", reg="gdr",
                      mode="lora", epochs=4, batch_size=2, max_len=128, precision="bf16", eval_samples=4,
                      progress=False, cache_dir=cache, lr=1e-4))
print(json.dumps(seen[::2]))  # one sample per step (forget + retain batch)
"""


def test_padded_rows_buckets():
    assert [padded_rows(n) for n in (0, 1, 64, 65, 256, 257, 300, 513, 4000)] == \
        [0, 64, 64, 128, 256, 320, 320, 640, 4096]
    for n in range(1, 5000):
        p = padded_rows(n)
        assert 0 <= p - n < max(64, n / 4)
    assert len({padded_rows(n) for n in range(1, 4097)}) <= 24


@pytest.mark.slow
def test_rss_does_not_grow_with_steps(tiny_dir, shared_data, tmp_path):
    lines = (shared_data / "tofu" / "retain90.json").read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "retain.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path / "o"), str(tiny_dir),
                        str(shared_data / "tofu" / "forget01.json"), str(tmp_path / "retain.jsonl"),
                        str(tmp_path / "cache")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    n = len(rss) // 4  # one epoch: 20 steps
    assert n >= 15
    start = rss[1]
    growth_n, growth_4n = rss[n] - start, rss[-1] - start
    assert growth_4n - growth_n < TOL_MB, (growth_n, growth_4n, rss)

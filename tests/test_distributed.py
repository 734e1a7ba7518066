"""qru.train.distributed: the rank split of a global batch, and a 2-process gloo launch (torchrun)
whose rank 1 cannot see the data fails on every rank with a message naming rank 1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qru.train import distributed as D

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, args: list[str], cwd=ROOT, timeout=300, env=None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N ARGS`` from the repository root."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **(env or {})}
    for k in D.ENV_VARS:
        e.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


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
def test_rank_that_cannot_see_data_fails_on_every_rank(tmp_path):
    r = torchrun(2, [str(ROOT / "tests" / "dist_worker.py"), "check", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        msg = (tmp_path / f"error{rank}.txt").read_text()
        assert "rank 1 (host" in msg and "data-rank1.json" in msg and "rank 0" not in msg
        agree = (tmp_path / f"agree{rank}.txt").read_text()
        assert "ranks disagree on the forget data (examples)" in agree and "rank 1: 11" in agree

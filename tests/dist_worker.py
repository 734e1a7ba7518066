"""Worker for tests/test_distributed.py, run under torchrun (gloo): ``dist_worker.py CASE DIR``."""
import json
import os
import sys
from pathlib import Path

import torch

from qru.train import distributed as D


def case_check(out: Path) -> None:
    """Rank 1 cannot read the data file: every rank raises the same LaunchError naming rank 1."""
    with D.session(torch.device("cpu")) as d:
        path = out / f"data-rank{d.rank}.json"
        if d.rank == 0:
            path.write_text("{}")
        try:
            D.check_all(d, lambda: path.read_text())
        except D.LaunchError as e:
            (out / f"error{d.rank}.txt").write_text(str(e))
        D.agree(d, "a constant", 3)
        try:
            D.agree(d, "the forget data (examples)", 10 + d.rank)
        except D.LaunchError as e:
            (out / f"agree{d.rank}.txt").write_text(str(e))


if __name__ == "__main__":
    torch.set_num_threads(1)
    globals()[f"case_{sys.argv[1]}"](Path(sys.argv[2]))

"""Worker for tests/test_distributed.py, run under torchrun (gloo): ``dist_worker.py CASE DIR``."""
import json
import os
import sys
import traceback
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
        # a sharded model's HF checkpoint, streamed file by file, is the one the unsharded model writes
        from qru.model.checkpoint import write_pretrained
        from qru.model.config import LlamaConfig
        from qru.model.llama import Llama

        torch.manual_seed(0)
        model = Llama(LlamaConfig.preset("tiny", tie_word_embeddings=True))
        if d.is_main:
            (out / "plain").mkdir()
            write_pretrained(model, out / "plain", max_shard_size="100KB")
            (out / "sharded").mkdir()
        D.shard_model(model, d)
        D.barrier(d)
        D.write_model(model, out / "sharded", d, max_shard_size="100KB")
        try:
            D.agree(d, "the forget data (examples)", 10 + d.rank)
        except D.LaunchError as e:
            (out / f"agree{d.rank}.txt").write_text(str(e))


def case_train(spec: Path) -> None:
    """Run the unlearn / pretrain configs listed in the JSON file ``spec`` one after the other (each
    call joins the process group the first one created); rank 0 records each run's status or error."""
    from qru.train.config import PretrainConfig, UnlearnConfig
    from qru.train.pretrain import pretrain
    from qru.train.unlearn import unlearn

    runs = json.loads(spec.read_text())
    results = []
    with D.session(torch.device("cpu")):
        for run in runs:
            cfg = (UnlearnConfig if run["kind"] == "unlearn" else PretrainConfig)(**run["cfg"])
            try:
                res = (unlearn if run["kind"] == "unlearn" else pretrain)(cfg)
                results.append({"status": res.status, "steps": res.steps})
            except Exception as e:  # noqa: BLE001 - the test checks the message
                traceback.print_exc()
                results.append({"error": f"{type(e).__name__}: {e}"})
    if int(os.environ["RANK"]) == 0:
        spec.with_suffix(".result.json").write_text(json.dumps(results))


if __name__ == "__main__":
    torch.set_num_threads(1)
    globals()[f"case_{sys.argv[1]}"](Path(sys.argv[2]))

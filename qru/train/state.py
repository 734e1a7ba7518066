"""Run state on disk: the run directory, checkpoints and resume, ``metrics.jsonl`` and ``run.json``.

Commit protocol (:mod:`qru.io`): the run holds the lock ``.OUT.lock`` and works in ``.OUT.run/``
beside ``out`` (:func:`work_dir`); only a finished run is committed to ``out``, with one atomic
rename, so a previous ``out`` (which needs ``overwrite=True``) stays intact until then. While a run
is unfinished the work directory holds ``checkpoint-<step>/`` directories (every ``save_every``
steps, at ``stop_after`` and on Ctrl-C), each committed atomically with a ``COMPLETE`` marker written
last; the last two complete ones are kept. ``resume=True`` continues from the newest complete one
bit-identically (trainable parameters, AdamW state, step, data positions, RNG states); incomplete
ones are ignored, and a run killed before its first checkpoint restarts from step 0. A new run
(no ``resume``) discards an unfinished run that has a checkpoint only with ``overwrite=True``.
``keep_checkpoint=True`` carries the checkpoints into ``out``.

Under torchrun (:mod:`qru.train.distributed`) rank 0 owns the run directory, the lock and the
commit; a checkpoint holds the trainable tensors and the optimizer state as DCP shards (one file
per rank, ``.metadata`` last) instead of ``trainable.safetensors`` / ``optimizer.pt``, resumable at
any world size under torchrun (DCP reshards), not in one process.

``metrics.jsonl`` is only ever appended to: after a resume it may hold rows of the interrupted run
past the resumed checkpoint, so a reader that wants the rows up to a step dedupes by ``step``,
keeping the last occurrence (:func:`read_metrics`).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import warnings
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qru import __version__
from qru.io import (append_text, check_output, clean_stale, clean_stale_in, commit_dir, fault_point, staged_dir,
                    target_lock, write_json, write_text)
from qru.train import distributed as D
from qru.train.config import TrainConfigError

CKPT_PREFIX = "checkpoint-"
COMPLETE = "COMPLETE"
KEEP_CHECKPOINTS = 2
METRICS = "metrics.jsonl"
RUN_JSON = "run.json"
# Options that may differ between a run and its resumption.
_RESUME_FREE = {"resume", "stop_after", "progress", "save_every", "log_every", "keep_checkpoint", "cache_dir",
                "device", "overwrite", "threads"}


def versions() -> dict:
    v = {"qru": __version__, "torch": torch.__version__, "python": platform.python_version(),
         "platform": platform.platform()}
    for dist in ("transformers", "peft", "sentencepiece", "safetensors", "triton"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return v


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _trainable_named(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def work_dir(out: str | os.PathLike) -> Path:
    """Where a run into ``out`` trains until it commits: ``.OUT.run`` beside ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}.run"


def _ckpt_step(p: Path) -> int | None:
    tail = p.name[len(CKPT_PREFIX):]
    return int(tail) if p.name.startswith(CKPT_PREFIX) and tail.isdigit() else None


def _is_complete(p: Path) -> bool:
    try:
        info = json.loads((p / COMPLETE).read_text())
        return all((p / f).is_file() and (p / f).stat().st_size == n for f, n in info["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete ``checkpoint-<step>/`` directories of ``run_dir``, oldest first (incomplete ones,
    without a valid ``COMPLETE`` marker, are left out)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(_ckpt_step(p), p) for p in run_dir.iterdir() if p.is_dir() and _ckpt_step(p) is not None]
    return [p for _, p in sorted(found) if _is_complete(p)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    ck = list_checkpoints(run_dir)
    return ck[-1] if ck else None


def save_checkpoint(run_dir: Path, model, optimizer, state: dict, d: D.Dist | None = None) -> Path:
    """Write ``run_dir/checkpoint-<step>``: trainable tensors, optimizer, loop state (step, data
    positions, RNG, extras), and the ``COMPLETE`` marker last, committed with one rename. Then keep
    only the newest ``KEEP_CHECKPOINTS`` complete checkpoints. Data parallel (``d``): the tensors
    and optimizer state go through DCP, one file per rank, into rank 0's stage; rank 0 writes the
    loop state (its RNG) and commits."""
    run_dir = Path(run_dir)
    ckpt = run_dir / f"{CKPT_PREFIX}{int(state['step'])}"
    if d is not None and not d.is_main:
        D.save_sharded(d, None, model, optimizer)
        D.barrier(d)
        return ckpt
    with staged_dir(ckpt, lock=False) as stage:  # the run holds the output's lock
        if d is not None:
            D.save_sharded(d, stage, model, optimizer)
            fault_point(f"checkpoint shards {ckpt}")
        else:
            save_file({n: p.detach().cpu().contiguous() for n, p in _trainable_named(model).items()},
                      str(stage / "trainable.safetensors"))
            fault_point(f"checkpoint tensors {ckpt}")
            torch.save(optimizer.state_dict(), stage / "optimizer.pt")
            fault_point(f"checkpoint optimizer {ckpt}")
        torch.save({**state, "rng": _rng_state(), "world_size": d.world if d is not None else None},
                   stage / "state.pt")
        files = {f.name: f.stat().st_size for f in stage.iterdir()}
        write_json(stage / COMPLETE, {"step": int(state["step"]), "files": files})
    D.barrier(d)
    keep = list_checkpoints(run_dir)[-KEEP_CHECKPOINTS:]
    for p in run_dir.iterdir():
        if p.is_dir() and _ckpt_step(p) is not None and p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return ckpt


def _drop_checkpoints(run_dir: Path) -> None:
    for p in Path(run_dir).iterdir():
        if p.is_dir() and _ckpt_step(p) is not None:
            shutil.rmtree(p, ignore_errors=True)


def _need_checkpoint(run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"resume: no checkpoint: {run_dir} holds no complete {CKPT_PREFIX}<step> "
                                "directory (run without resume first)")
    return ckpt


def read_checkpoint_state(run_dir: Path) -> dict:
    """The loop state of the newest complete checkpoint in ``run_dir``."""
    return torch.load(_need_checkpoint(Path(run_dir)) / "state.pt", map_location="cpu", weights_only=True)


def load_checkpoint(run_dir: Path, model, optimizer, d: D.Dist | None = None) -> dict:
    """Restore the trainable parameters and optimizer from the newest complete checkpoint in
    ``run_dir``; returns its loop state. A sharded (DCP) checkpoint loads at any world size under
    torchrun, a one-process checkpoint only in one process."""
    ckpt = _need_checkpoint(Path(run_dir))
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    sharded = (ckpt / D.SHARDED_MARKER).is_file()
    if sharded and d is None:
        raise TrainConfigError(f"resume: world size mismatch: {ckpt} is a sharded checkpoint of a "
                               f"{state.get('world_size')}-process run and this is one process without torchrun; "
                               "resume it under torchrun (any --nproc-per-node, DCP reshards)")
    if d is not None and not sharded:
        raise TrainConfigError(f"resume: world size mismatch: {ckpt} was written by a one-process run and this "
                               f"launch has {d.world} process(es) under torchrun; resume it without torchrun")
    if d is not None:
        D.load_sharded(d, ckpt, model, optimizer)
        return state
    saved = load_file(str(ckpt / "trainable.safetensors"))
    params = _trainable_named(model)
    if saved.keys() != params.keys():
        diff = sorted(saved.keys() ^ params.keys())
        raise TrainConfigError(f"resume: checkpoint {ckpt} does not match the model's trainable parameters "
                               f"(differ: {diff[:5]})")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape or saved[n].dtype != p.dtype:
                raise TrainConfigError(f"resume: {ckpt}: tensor {n!r} is {saved[n].dtype}{tuple(saved[n].shape)}, "
                                       f"the model has {p.dtype}{tuple(p.shape)}")
            p.copy_(saved[n])
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    return state


def check_resume_config(saved: dict, current: dict) -> None:
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in _RESUME_FREE and saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:5])
        raise TrainConfigError(f"resume: options differ from the checkpointed run ({detail})")


def append_metrics(path: Path, rows: list[dict]) -> None:
    append_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: str | os.PathLike, up_to: int | None = None) -> list[dict]:
    """The rows of a ``metrics.jsonl`` by step: an append-only log in which a resumed run repeats the
    steps after its checkpoint, so rows are deduplicated by ``step`` keeping the last occurrence
    (``up_to``: only steps <= it). A torn line (a kill mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if up_to is None or step <= up_to:
            by_step[step] = row
    return [by_step[k] for k in sorted(by_step)]




def write_run_json(run_dir: Path, command: str, cfg, extra: dict) -> None:
    write_text(run_dir / RUN_JSON, json.dumps({"command": command, "config": asdict(cfg), "seed": cfg.seed,
                                               "versions": versions(), **extra}, indent=2, default=str) + "\n")


def claim_run(d: D.Dist | None, owner: contextlib.ExitStack, target, inputs: dict, overwrite: bool,
              resume: bool) -> tuple[Path, Path, bool]:
    """Claim a run's output, on rank 0 only (one process: here): ``target`` is checked against its
    ``inputs`` (:func:`qru.io.check_output`), locked for the life of ``owner`` and given its work
    directory (:func:`prepare_work`). Every rank gets ``(out, work, resume)``; a refusal is raised on every rank."""
    def claim():
        out = check_output(target, inputs, overwrite=overwrite, option="out")
        owner.enter_context(target_lock(out))
        return (out, *prepare_work(out, resume, overwrite))
    return D.on_main(d, claim)


def prepare_work(out: Path, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """The run directory of ``out`` (the caller holds the lock), and whether there is a checkpoint to
    resume from. Stale stages of dead runs are removed; an unfinished run is kept for ``resume`` and
    discarded by a new run only with ``overwrite``."""
    clean_stale(out)
    work = work_dir(out)
    clean_stale_in(work)  # stages / temp files of a killed run (it is dead: we hold the lock)
    ckpt = latest_checkpoint(work)
    if resume:
        if not work.is_dir():
            raise FileNotFoundError(f"resume: no checkpoint: no unfinished run of {out} ({work} does not exist); "
                                    "run without resume first")
        if ckpt is not None:
            return work, True
        warnings.warn(f"resume: {work} holds no complete checkpoint (the run was stopped before its first one); "
                      "starting from step 0")
    elif ckpt is not None and not overwrite:
        raise TrainConfigError(f"{out} has an unfinished run in {work} ({ckpt.name}); continue it with resume "
                               "(--resume) or pass overwrite (--overwrite) to discard it")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work, False


def finish_run(work: Path, out: Path, keep_checkpoint: bool) -> None:
    """Commit the finished run: ``work`` becomes ``out`` in one rename (the old ``out`` is removed after)."""
    if not keep_checkpoint:
        _drop_checkpoints(work)
    clean_stale_in(work)
    commit_dir(work, out)

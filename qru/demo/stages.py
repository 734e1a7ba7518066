"""Cached pipeline stages: one directory per stage, named by the stage and the hash of its inputs.

``StageCache.run(name, key, fn)`` hashes ``key`` (the stage's settings plus the hashes of the
stages it reads), and returns the cached result when ``ROOT/NAME-HASH/manifest.json`` exists;
otherwise ``fn(tmp_dir)`` builds the stage in a temporary directory beside it, the manifest is
written last and the directory renamed into place (a crash leaves no half-built stage). Changed
settings give a new hash, so they recompute; ``force`` recomputes every stage once per run.

Several processes may share one root (``qru demo --preset pretrained`` builds stages in worker
processes): a stage being built lives in ``.NAME-HASH.<pid>.<random>.partial`` (:func:`qru.io.stage_path`),
and :meth:`StageCache.prune` removes such directories only when their owner process is dead.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qru.demo.presets import stable_hash
from qru.io import clean_stale_in, commit_dir, pid_alive, stage_path, write_json, write_text

MANIFEST = "manifest.json"
_LEGACY_TMP = re.compile(r"\..+\.tmp-(\d+)-[0-9a-f]{8}")  # the temporary directories of earlier versions


def atomic_write_json(path: Path, obj, indent: int | None = 2) -> None:
    write_json(path, obj, indent=indent, sort_keys=False, default=str)


def atomic_write_text(path: Path, text: str) -> None:
    write_text(path, text)


@dataclass
class Stage:
    name: str
    dir: Path
    hash: str
    result: dict
    cached: bool
    seconds: float  # time spent computing it (the original time when cached)
    cpu_seconds: float | None = None  # CPU time of the building process while computing it (None: not recorded)


@dataclass
class StageCache:
    root: Path
    force: bool = False
    log: Callable[[str], None] = print
    used: dict[str, Stage] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)

    def path(self, name: str, h: str) -> Path:
        return self.root / f"{name}-{h}"

    def lookup(self, name: str, key: dict) -> Stage | None:
        """The cached stage for ``key`` (ignoring ``force``), or None."""
        h = stable_hash({"stage": name, **key})
        d = self.path(name, h)
        try:
            man = json.loads((d / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if man.get("hash") != h or not man.get("done"):
            return None
        cpu = man.get("cpu_seconds")
        return Stage(name, d, h, man.get("result") or {}, True, float(man.get("seconds", 0.0)),
                     None if cpu is None else float(cpu))

    def run(self, name: str, key: dict, fn: Callable[[Path], dict | None]) -> Stage:
        h = stable_hash({"stage": name, **key})
        if name in self.used and self.used[name].hash == h:
            return self.used[name]
        cached = None if self.force else self.lookup(name, key)
        if cached is not None:
            self.used[name] = cached
            return cached
        d = self.path(name, h)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = stage_path(d)  # carries this process's pid: prune leaves it alone while we live
        tmp.mkdir()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result = fn(tmp) or {}
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            atomic_write_json(tmp / MANIFEST, {"stage": name, "hash": h, "done": True, "seconds": round(secs, 3),
                                               "cpu_seconds": round(cpu, 3),
                                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "key": key,
                                               "result": result})
            commit_dir(tmp, d)  # one rename (a swap when d exists); the old one is removed after
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        st = Stage(name, d, h, result, False, secs, cpu)
        self.used[name] = st
        return st

    def prune(self) -> list[Path]:
        """Remove stage directories of the stages used in this run that belong to other settings, and
        leftovers of interrupted builds whose process is dead (a live process's build in progress stays,
        whatever its stage). Returns what was removed."""
        if not self.root.is_dir():
            return []
        removed = clean_stale_in(self.root)
        keep = {st.dir.name for st in self.used.values()}
        names = set(self.used)
        for p in sorted(self.root.iterdir()):
            legacy = _LEGACY_TMP.fullmatch(p.name)
            if legacy:
                other = not pid_alive(int(legacy.group(1)))
            else:
                other = not p.name.startswith(".") and p.name.rsplit("-", 1)[0] in names and p.name not in keep
            if other:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

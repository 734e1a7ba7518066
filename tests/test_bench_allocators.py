"""bench.harness's fair-ratio plumbing: the allocator settings, a suite rerun per setting in a fresh
process (each row's allocator column names its setting), and the share of a ratio that allocation
accounts for, against hand-computed values."""
import csv
import sys
from pathlib import Path

import pytest

from bench import harness as H

ROOT = Path(__file__).resolve().parents[1]

SUITE = '''
import os, sys
sys.path.insert(0, {root!r})
from bench.harness import Row, add_allocator_arg, report, run_under_allocators
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=1)
add_allocator_arg(ap)
args = ap.parse_args()
if args.allocators is not None:
    sys.exit(run_under_allocators(__file__, None, args.allocators))
# a fake suite: qru's ratio is 2.0 under glibc's defaults and 1.6 with freed memory kept
ratio = 1.6 if os.environ.get("MALLOC_MMAP_THRESHOLD_") else 2.0
report("fake", [Row("fake", "op", "peer", f"n{{args.size}}", "fp32", "cpu", 2.0, 2.0, 2.0, "s", 1.0),
                Row("fake", "op", "qru", f"n{{args.size}}", "fp32", "cpu", 2.0 / ratio, 1.0, 1.0, "s", ratio),
                Row("fake", "op mem", "qru", f"n{{args.size}}", "fp32", "cpu", 5.0, 5.0, 5.0, "MiB", 0.5)])
'''


def test_settings_keep_freed_memory_within_glibc_limits(monkeypatch, tmp_path):
    s = H.allocator_settings()
    assert s["default"] == {}
    assert int(s["glibc-keep"]["MALLOC_MMAP_THRESHOLD_"]) <= 32 << 20  # glibc ignores a larger value
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    monkeypatch.setattr(H, "LIB_DIRS", (str(tmp_path),))
    assert H.allocator_settings()["jemalloc"] == {"LD_PRELOAD": str(tmp_path / "libjemalloc.so.2")}


def test_allocators_option_is_removed_from_the_child_arguments():
    argv = ["--quick", "--allocators", "default", "glibc-keep", "--threads", "1"]
    assert H._strip_allocator_arg(argv) == ["--quick", "--threads", "1"]
    assert H._strip_allocator_arg(["--allocators"]) == []


@pytest.mark.slow  # two child processes that import torch
def test_suite_runs_once_per_setting_and_prints_the_allocation_share(tmp_path, monkeypatch, capfd):
    script = tmp_path / "suite.py"
    script.write_text(SUITE.format(root=str(ROOT)))
    out = tmp_path / "rows.csv"
    monkeypatch.setenv("QRU_BENCH_CSV", str(out))
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the parent's own tunables do not leak into a setting
    monkeypatch.setattr(sys, "argv", [str(script), "--size", "3", "--allocators", "default", "glibc-keep"])
    assert H.run_under_allocators(str(script), None, ["default", "glibc-keep"]) == 0
    printed = capfd.readouterr().out
    split = printed.split("## ratios under each allocator setting")[1].splitlines()
    line = next(ln for ln in split if ln.startswith("op | qru | n3 | fp32"))
    assert line.split()[-3:] == ["2.00x", "1.60x", "1.25"]  # share = 2.0 / 1.6
    assert not any(ln.startswith("op mem") for ln in split)  # memory rows are no speed ratio
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    alloc = sorted({r["allocator"] for r in rows})
    assert alloc == ["glibc", "glibc MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1099511627776 "
                              "MALLOC_TOP_PAD_=67108864"]

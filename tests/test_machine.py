"""The machine description benchmarks record (qru.kernels.machine) and the CSV/plot grouping by machine."""
import csv
import sys
from pathlib import Path

import torch

from qru.kernels import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402
import plot  # noqa: E402

SPR = ("fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 "
       "amx_bf16 amx_tile amx_int8")
GENOA = "fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16"
ROME = "fpu sse2 avx avx2 fma bmi2"


def test_parse_cpuinfo_first_processor():
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            f"flags\t\t: {SPR}\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    model, flags = machine.parse_cpuinfo(text)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == set(SPR.split())


def test_isa_levels_of_the_three_machine_kinds():
    assert machine.isa_level(set(SPR.split())) == "amx"
    assert machine.isa_level(set(GENOA.split())) == "avx512_bf16"
    assert machine.isa_level(set(GENOA.split()) - {"avx512_bf16"}) == "avx512"
    assert machine.isa_level(set(ROME.split())) == "avx2"
    assert machine.isa_level({"fpu", "sse2"}) == "baseline"
    # AMX tiles without AVX-512 BF16 is not the amx level (its kernels need both)
    assert machine.isa_level({"amx_bf16", "amx_tile", "avx2", "fma"}) == "avx2"


def test_isa_level_agrees_with_torch():
    cap = torch.backends.cpu.get_cpu_capability()  # what torch's own dispatch detected
    level = machine.isa_level()
    if cap.startswith("AVX512"):
        assert level in ("avx512", "avx512_bf16", "amx")
    elif cap == "AVX2":
        assert level == "avx2"


def test_allocator_names_preload_and_tunables():
    assert machine.allocator({}) == "glibc"
    env = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "MALLOC_TRIM_THRESHOLD_": "268435456"}
    assert machine.allocator(env) == "libjemalloc MALLOC_TRIM_THRESHOLD_=268435456"
    assert machine.allocator({"MALLOC_MMAP_THRESHOLD_": "33554432"}) == "glibc MALLOC_MMAP_THRESHOLD_=33554432"


def test_describe_has_every_machine_column():
    d = machine.describe()
    assert list(d) == harness.MACHINE_COLUMNS
    assert d["threads"] == str(torch.get_num_threads()) and d["torch"] == torch.__version__


def test_append_csv_migrates_an_old_header_and_records_the_machine(tmp_path):
    old = harness.COLUMNS[:13]
    p = tmp_path / "r.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(old)
        w.writerow(["s", "op", "qru", "x", "fp32", "cpu", "1", "1", "1", "s", "", "abc", "2026-01-01T00:00:00"])
    t = harness.Timing(2.0, 1.0, 3.0)
    harness.append_csv([harness.Row.of("s", "op", "qru", "y", "fp32", "cpu", t)], p)
    rows = list(csv.DictReader(open(p, newline="")))
    assert list(rows[0]) == harness.COLUMNS
    assert rows[0]["shape"] == "x" and rows[0]["cpu_model"] == ""  # old row: machine unrecorded
    assert rows[1]["shape"] == "y" and rows[1]["median"] == "2"
    assert {k: rows[1][k] for k in harness.MACHINE_COLUMNS} == machine.describe()


def test_plot_groups_latest_runs_by_machine():
    base = {"suite": "step", "device": "cpu", "op": "o", "provider": "qru", "shape": "s", "unit": "s"}
    rows = [{**base, "timestamp": "1", "cpu_model": "AMD EPYC", "isa": "avx2"},
            {**base, "timestamp": "2", "cpu_model": "Intel Xeon", "isa": "amx"},
            {**base, "timestamp": "3", "cpu_model": "Intel Xeon", "isa": "amx"},
            {**base, "timestamp": "0", "cpu_model": "", "isa": ""}]
    runs = plot.latest_runs(rows)
    assert set(runs) == {("step", "cpu", "AMD EPYC (avx2)"), ("step", "cpu", "Intel Xeon (amx)"),
                         ("step", "cpu", "unrecorded")}
    assert [r["timestamp"] for r in runs[("step", "cpu", "Intel Xeon (amx)")]] == ["3"]

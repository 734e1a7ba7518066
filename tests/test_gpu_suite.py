"""bench/gpu_suite.py without a GPU: importable, skips cleanly, and its row / CSV plumbing turns
(fake) timings into the harness CSV with the values computed by hand."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_suite as G
from bench.harness import COLUMNS, MACHINE_COLUMNS, Timing

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")


@no_cuda
def test_main_without_cuda_skips(tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert G.main([], csv_path=out) == 0
    assert "no CUDA: skipped" in capsys.readouterr().out
    assert not out.exists()


@no_cuda
def test_script_exits_zero_without_cuda():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--budget", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "no CUDA: skipped" in p.stdout


def test_rows_and_csv(tmp_path):
    copy = Timing(0.002, 0.0019, 0.0021)
    times = {"bitsandbytes": Timing(0.004, 0.0039, 0.0042), "qru-triton": Timing(0.0025, 0.0024, 0.0026)}
    rows = G.copy_rows("nf4_dequantize", "8x8", times, 4_000_000, copy, "bitsandbytes")
    rows += G.time_rows("lora fwd+bwd", "M2", "bf16", {"peft": Timing(2.0, 1.9, 2.1), "qru": Timing(0.5, 0.4, 0.6)},
                        "peft", unit="TFLOP/s", work=10.0)
    out = tmp_path / "r.csv"
    G.report("fake", rows, out)
    got = list(csv.DictReader(out.open()))
    assert list(got[0]) == COLUMNS and all(got[0][c] != "" for c in ("cpu_model", "isa", "cores"))
    by = {(r["op"], r["provider"]): r for r in got}
    c = by[("nf4_dequantize", "copy")]
    assert (c["unit"], float(c["median"])) == ("GB/s", pytest.approx(4_000_000 / 0.002 / 1e9))
    q = by[("nf4_dequantize", "qru-triton")]
    assert q["unit"] == "% copy" and float(q["median"]) == pytest.approx(80.0)  # 100 * 2 ms / 2.5 ms
    assert float(q["ratio_vs_peer"]) == pytest.approx(1.6)  # 4 ms / 2.5 ms
    assert float(q["p20"]) <= float(q["median"]) <= float(q["p80"])
    assert float(by[("nf4_dequantize", "bitsandbytes")]["median"]) == pytest.approx(50.0)
    lq = by[("lora fwd+bwd", "qru")]
    assert (float(lq["median"]), float(lq["ratio_vs_peer"])) == (pytest.approx(20.0), pytest.approx(4.0))
    assert {r["suite"] for r in got} == {"gpu"} and {r["device"] for r in got} == {"cuda"}
    assert set(MACHINE_COLUMNS) <= set(got[0])


def test_run_sections_budget_and_failures():
    now = [0.0]

    def clock():
        return now[0]

    def a():
        now[0] += 10
        return G.time_rows("a", "s", "bf16", {"p": Timing(1, 1, 1)}, "p")

    def boom():
        now[0] += 5
        raise RuntimeError("no kernel for this device")

    def late():
        raise AssertionError("must not run past the budget")

    rows, notes = G.run_sections({"a": a, "b": boom, "c": late}, budget_s=15, clock=clock)
    assert [r.op for r in rows] == ["a"]
    assert notes[0].startswith("a: 1 rows") and "RuntimeError: no kernel" in notes[1]
    assert notes[2] == "c: skipped (budget of 15 s spent)"

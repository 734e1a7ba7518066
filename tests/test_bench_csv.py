"""bench/results.csv, the committed record every benchmark appends to, stays readable by
bench/plot.py: one header (bench.harness.COLUMNS), numeric medians, no row recorded twice
(a text merge of two branches' appends once duplicated a whole block, header included)."""
import csv
import math
from pathlib import Path

from bench.harness import COLUMNS, RESULTS_CSV


def test_results_csv_is_one_table():
    with open(Path(RESULTS_CSV), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == COLUMNS
    body = rows[1:]
    assert body, "no rows"
    assert COLUMNS not in body, "a second header line"
    assert all(len(r) == len(COLUMNS) for r in body), [i for i, r in enumerate(body, 2) if len(r) != len(COLUMNS)][:5]
    for i, r in enumerate(body, 2):
        for c in ("median", "p20", "p80"):
            v = float(r[COLUMNS.index(c)])
            assert math.isfinite(v), (i, c, r)
    dup = len(body) - len({tuple(r) for r in body})
    assert dup == 0, f"{dup} rows recorded twice"

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


def test_balanced_orders_let_every_provider_follow_every_other_equally_often():
    from collections import Counter

    from bench.harness import balanced_orders

    for k in range(2, 8):
        rows = balanced_orders(k)
        assert all(sorted(r) == list(range(k)) for r in rows)
        follows = Counter((r[i], r[i + 1]) for r in rows for i in range(k - 1))
        assert len(follows) == k * (k - 1) and len(set(follows.values())) == 1, (k, follows)
        seq = [x for r in rows for x in r] * 2  # the rotation repeats: the wrap counts too
        if k > 2:
            assert all(a != b for a, b in zip(seq, seq[1:])), (k, rows)


def test_paired_runs_the_providers_in_the_balanced_orders():
    from bench.harness import balanced_orders, paired

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times, ratios = paired(fns, samples=8, warmup=0)
    orders = balanced_orders(4)
    assert calls == ["abcd"[j] for i in range(8) for j in orders[i % 4]]
    assert all(len(t.samples) == 8 for t in times.values()) and ratios["a"] == 1.0

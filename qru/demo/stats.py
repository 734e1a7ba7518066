"""Statistics of the demo and the sweep: paired effects with Student-t 95% intervals, and Holm's
step-down correction for a family of comparisons.

An *effect* is a paired difference per (method, unlearning seed), e.g. KnowMem_f at 4-bit minus
KnowMem_f at bf16 of the same unlearned model. The unit of replication is the unlearning seed: the
differences of one seed are averaged over the methods, giving k per-seed values d_s, and

* ``effect`` = mean of d_s; ``se_seed`` = sd(d_s) / sqrt(k), with k - 1 degrees of freedom;
* ``se_items``: the evaluation items are the same for every seed, so their sampling noise is not in
  the seed-to-seed spread. Per item, the difference averaged over all (method, seed) pairs gives n
  values; ``se_items`` = their sd / sqrt(n), with n - 1 degrees of freedom;
* ``se`` = sqrt(se_seed^2 + se_items^2), its degrees of freedom by Welch-Satterthwaite;
* the 95% interval is ``effect +- t(0.975, df) * se`` and ``p`` the two-sided t-test p-value.

With one seed the seed noise is unknown, so nothing is shown. An effect is *shown* when its
interval excludes 0 (``p < 0.05``) and ``|effect| >= min_effect`` points.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from scipy import stats as _st

LEVEL = 0.95
ALPHA = 1 - LEVEL


def t_crit(df: float, level: float = LEVEL) -> float:
    """The two-sided Student-t critical value: ``t.ppf((1 + level) / 2, df)``."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(_st.t.ppf((1 + level) / 2, df))


def welch_df(parts: Sequence[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of ``sqrt(sum se_i^2)`` for ``(se_i, df_i)`` parts."""
    num = sum(se ** 2 for se, _ in parts) ** 2
    den = sum(se ** 4 / df for se, df in parts if se > 0)
    if den == 0:
        return float(min(df for _, df in parts))
    return num / den


def t_test(effect: float, se: float, df: float, level: float = LEVEL) -> tuple[list[float], float]:
    """``(interval, p)``: the ``level`` interval ``effect +- t * se`` and the two-sided p-value."""
    h = t_crit(df, level) * se
    if se == 0:
        p = 1.0 if effect == 0 else 0.0
    else:
        p = float(2 * _st.t.sf(abs(effect) / se, df))
    return [effect - h, effect + h], p


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None entries are skipped and stay None).

    Sorted ascending, the i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``;
    rejecting where the adjusted p < alpha controls the family-wise error rate at alpha.
    """
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def effect_stats(diffs: dict[tuple[str, int], float], item_diffs: dict | None = None, *,
                 min_effect: float = 0.0, level: float = LEVEL) -> dict:
    """Mean paired effect, its standard errors, 95% Student-t interval and p-value (module docstring).

    ``diffs``: ``{(method, seed): difference}``; ``item_diffs``: ``{(method, seed): [per-item difference]}``
    (used when it covers every key with the same number of items, more than one).
    """
    empty = {"effect": None, "noise_sd": None, "se_seed": None, "se_items": None, "se": None, "df": None,
             "t_crit": None, "ci": None, "p": None, "level": level, "n_seeds": 0, "n_methods": 0, "shown": False}
    if not diffs:
        return empty
    methods = sorted({m for m, _ in diffs})
    seeds = sorted({s for _, s in diffs})
    per_seed = [statistics.fmean(d for (_, s), d in diffs.items() if s == seed) for seed in seeds]
    k = len(per_seed)
    out = dict(empty, effect=statistics.fmean(per_seed), n_seeds=k, n_methods=len(methods))
    if k < 2:
        return out
    sd = statistics.stdev(per_seed)
    out["noise_sd"], out["se_seed"] = sd, sd / math.sqrt(k)
    parts = [(out["se_seed"], k - 1)]
    lens = {len(v) for v in (item_diffs or {}).values()}
    if item_diffs and set(item_diffs) == set(diffs) and len(lens) == 1 and lens.pop() > 1:
        cols = list(zip(*item_diffs.values()))
        per_item = [statistics.fmean(c) for c in cols]
        out["se_items"] = statistics.stdev(per_item) / math.sqrt(len(per_item))
        parts.append((out["se_items"], len(per_item) - 1))
    out["se"] = math.sqrt(sum(se ** 2 for se, _ in parts))
    out["df"] = welch_df(parts)
    out["t_crit"] = t_crit(out["df"], level)
    out["ci"], out["p"] = t_test(out["effect"], out["se"], out["df"], level)
    out["shown"] = bool(out["p"] < 1 - level and abs(out["effect"]) >= min_effect)
    return out

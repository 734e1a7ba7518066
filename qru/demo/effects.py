"""Paired effects over the demo's result records (one record per model x precision): record
selection, per-(method, unlearning seed) differences, their statistics (:mod:`qru.demo.stats` with
``MIN_EFFECT``) and how an effect is written in the report."""
from __future__ import annotations

from qru.demo import stats

MIN_EFFECT = 2.0  # points (metrics are 0-100 scores); smaller effects are never called "shown"


def matching(records, **match) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def value_of(records, metric, **match):
    rs = matching(records, **match)
    return rs[0][metric] if rs else None


def unlearned_keys(records) -> list[tuple[str, int]]:
    """(method, seed) pairs present in both modes."""
    keys = {}
    for r in records:
        if r["mode"] in ("full", "lora"):
            keys.setdefault((r["method"], r["seed"]), set()).add(r["mode"])
    return sorted(keys)


def paired(records, metric: str, a: dict, b: dict) -> dict[tuple[str, int], float]:
    """``metric(a) - metric(b)`` per (method, seed); ``a``/``b`` fix mode and precision."""
    return paired_items(records, metric, a, b)[0]


def paired_items(records, metric: str, a: dict, b: dict):
    """``(diffs, item_diffs)``: as :func:`paired`, plus the per-eval-item differences where both records
    carry ``items[metric]`` for the same items."""
    out, items = {}, {}
    for m, s in unlearned_keys(records):
        ra = matching(records, method=m, seed=s, **a)
        rb = matching(records, method=m, seed=s, **b)
        if not ra or not rb or ra[0][metric] is None or rb[0][metric] is None:
            continue
        out[(m, s)] = ra[0][metric] - rb[0][metric]
        ia, ib = (r[0].get("items", {}).get(metric) for r in (ra, rb))
        if ia and ib and len(ia) == len(ib) and len(ia) > 1:
            items[(m, s)] = [x - y for x, y in zip(ia, ib)]
    return out, items


def effect_stats(diffs: dict[tuple[str, int], float], item_diffs: dict | None = None) -> dict:
    """:func:`qru.demo.stats.effect_stats` with this report's ``MIN_EFFECT``."""
    return stats.effect_stats(diffs, item_diffs, min_effect=MIN_EFFECT)


def effect(records, metric: str, a: dict, b: dict) -> dict:
    """:func:`effect_stats` of the paired difference ``metric(a) - metric(b)``, item noise included."""
    return effect_stats(*paired_items(records, metric, a, b))


def num(x, nd=1, sign=False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def shown_word(st: dict) -> str:
    return "shown" if st.get("shown") else "not shown"


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def pm_text(st: dict) -> str:
    """'+3.2 points (95% CI -1.0 to +7.4, p = ...; SE ..., t(df) = ...; 2 seeds x 2 methods)'."""
    if st["effect"] is None:
        return "n/a (no paired records)"
    if st["ci"] is None:
        noise = "no interval: a single unlearning seed"
    else:
        noise = (f"95% CI {num(st['ci'][0], sign=True)} to {num(st['ci'][1], sign=True)}, p = {st['p']:.2g}; "
                 f"SE {num(st['se'])}"
                 + (f" (seeds {num(st['se_seed'])}, eval items {num(st['se_items'])}, in quadrature)"
                    if st.get("se_items") is not None else " (seeds)")
                 + f", t({st['df']:.1f}) = {st['t_crit']:.2f}")
    return f"{num(st['effect'], sign=True)} points ({noise}; {st['n_seeds']} seeds x {st['n_methods']} methods)"


def gap_pm_text(st: dict) -> str:
    """A scaled-gap change (a fraction, not points): effect and 95% CI, two decimals."""
    if st["ci"] is None:
        return f"{num(st['effect'], 2, sign=True)} (no interval: a single unlearning seed)"
    return (f"{num(st['effect'], 2, sign=True)} (95% CI {num(st['ci'][0], 2, sign=True)} to "
            f"{num(st['ci'][1], 2, sign=True)}, p = {st['p']:.2g}; {st['n_seeds']} seeds x {st['n_methods']} methods)")

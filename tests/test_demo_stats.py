"""Statistics of the demo and the sweep against hand-computed values and t tables: Student-t
intervals with k - 1 degrees of freedom, Welch-Satterthwaite, Holm's correction (the sweep's family),
the Min-40% gap scaled to target = 1 / retrain = 0 with its bootstrap interval."""
import math

import numpy as np
import pytest

from qru.demo import stats
from qru.demo.report import render_utility_line, sanity
from qru.demo.sweep import FAMILY, holm_family
from qru.eval.muse import gap_interval, min_k_gap, scaled_gap


def test_t_crit_matches_tables():
    # two-sided 95% critical values from a printed t table
    for df, want in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (10, 2.2281), (1000, 1.9623)):
        assert stats.t_crit(df) == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_crit(0)


def test_holm_hand_example():
    # m = 4 (None skipped): sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04)
    got = stats.holm([0.01, None, 0.04, 0.03, 0.005])
    assert got[1] is None
    assert got[0] == pytest.approx(0.03) and got[2] == pytest.approx(0.06)
    assert got[3] == pytest.approx(0.06) and got[4] == pytest.approx(0.02)
    assert stats.holm([0.5, 0.9]) == [pytest.approx(1.0), pytest.approx(1.0)]  # capped at 1
    assert stats.holm([]) == []


def test_effect_stats_hand_computed():
    # per-seed means over the two methods: 2, 6, 4 -> effect 4, sd 2, se 2/sqrt(3), df 2
    d = {("a", 0): 1.0, ("b", 0): 3.0, ("a", 1): 5.0, ("b", 1): 7.0, ("a", 2): 3.0, ("b", 2): 5.0}
    st = stats.effect_stats(d)
    se = 2 / math.sqrt(3)
    assert st["effect"] == pytest.approx(4.0) and st["noise_sd"] == pytest.approx(2.0)
    assert st["se"] == pytest.approx(se) and st["df"] == 2 and st["se_items"] is None
    assert st["ci"] == pytest.approx([4 - 4.302653 * se, 4 + 4.302653 * se], abs=1e-5)
    # t distribution with 2 df: P(T > t) = 1/2 - t / (2 sqrt(t^2 + 2))
    t = 4 / se
    assert st["p"] == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(t * t + 2))), rel=1e-9)
    assert st["ci"][0] < 0 and not st["shown"]  # 2 SE would have called it (4 > 2 * 1.15); t(2) does not
    assert stats.effect_stats(d, min_effect=0)["shown"] is False
    big = {k: v + 20 for k, v in d.items()}
    assert stats.effect_stats(big, min_effect=2)["shown"] and not stats.effect_stats(big, min_effect=30)["shown"]
    one = stats.effect_stats({("a", 0): 5.0, ("b", 0): 7.0})
    assert one["effect"] == 6.0 and one["ci"] is None and not one["shown"]  # one seed: nothing shown
    assert stats.effect_stats({})["effect"] is None


def test_effect_stats_items_welch():
    d = {("a", 0): 1.0, ("a", 1): 3.0}  # one method, seeds 1 and 3: se_seed = sqrt(2)/sqrt(2) = 1, df 1
    items = {("a", 0): [0.0, 2.0, 4.0], ("a", 1): [2.0, 4.0, 6.0]}  # per-item means 1, 3, 5: sd 2, se 2/sqrt3
    st = stats.effect_stats(d, items)
    se_i = 2 / math.sqrt(3)
    assert st["se_seed"] == pytest.approx(1.0) and st["se_items"] == pytest.approx(se_i)
    se2 = 1 + se_i ** 2
    assert st["se"] == pytest.approx(math.sqrt(se2))
    assert st["df"] == pytest.approx(se2 ** 2 / (1 / 1 + se_i ** 4 / 2))
    # items that do not cover every pair are ignored
    assert stats.effect_stats(d, {("a", 0): [1.0, 2.0]})["se_items"] is None


def _st(effect, p):
    return {"effect": effect, "p": p, "shown": p is not None and p < 0.05}


def test_sweep_holm_family():
    ps = iter([0.001, 0.02, 0.04, 0.5, None, 0.003, 0.01, 0.2, 0.03, 0.04])
    results = []
    for point in ("a", "b"):
        row = {"full": {}, "lora": {}}
        for mode, key in FAMILY:
            st = _st(10.0, next(ps))
            if mode is None:
                row[key] = st
            else:
                row[mode][key] = st
        results.append({"point": point, "summary": {"formats": {"nf4": row}}})
    n = holm_family(results, ["nf4"])
    assert n == 9
    flat = [(r["summary"]["formats"]["nf4"][k] if m is None else r["summary"]["formats"]["nf4"][m][k])
            for r in results for m, k in FAMILY]
    raw = [0.001, 0.02, 0.04, 0.5, None, 0.003, 0.01, 0.2, 0.03, 0.04]
    want = stats.holm(raw)
    # by hand: sorted 0.001*9=.009, .003*8=.024, .01*7=.07, .02*6=.12, .03*5=.15, .04*4=.16 (both), .2*2=.4, .5
    assert want[0] == pytest.approx(0.009) and want[5] == pytest.approx(0.024) and want[6] == pytest.approx(0.07)
    assert [s["p_holm"] for s in flat] == want
    assert [s["shown"] for s in flat] == [True, False, False, False, False, True, False, False, False, False]
    assert [s["shown_unadjusted"] for s in flat] == [p is not None and p < 0.05 for p in raw]


def test_min_k_gap_scaled_hand_computed():
    target = {"forget": [1.0, 1.0, 2.0], "holdout": [4.0, 5.0, 6.0]}  # gap 5 - 4/3 = 11/3
    retrain = {"forget": [3.0, 4.0, 5.0], "holdout": [4.0, 5.0, 6.0]}  # gap 1
    half = {"forget": [2.0, 2.5, 3.5], "holdout": [4.0, 5.0, 6.0]}  # gap 5 - 8/3 = 7/3: halfway
    assert min_k_gap(target["forget"], target["holdout"]) == pytest.approx(11 / 3)
    t = scaled_gap(target, target, retrain)
    r = scaled_gap(retrain, target, retrain)
    h = scaled_gap(half, target, retrain)
    assert t["value"] == pytest.approx(1.0) and r["value"] == pytest.approx(0.0)
    assert h["value"] == pytest.approx((7 / 3 - 1) / (11 / 3 - 1))
    assert t["ci"] == pytest.approx([1.0, 1.0]) and r["ci"] == pytest.approx([0.0, 0.0])
    assert scaled_gap(half, target, target)["value"] is None  # nothing to scale by
    with pytest.raises(ValueError, match="differ in length"):
        scaled_gap({"forget": [1.0], "holdout": [2.0]}, target, retrain)


def test_gap_bootstrap_covers_point():
    rng = np.random.default_rng(0)
    f, h = rng.normal(1.0, 1.0, 64), rng.normal(2.0, 1.0, 64)
    g = gap_interval(f, h, n_boot=1000, seed=1)
    assert g["gap"] == pytest.approx(h.mean() - f.mean())
    lo, hi = g["ci"]
    assert lo < g["gap"] < hi
    se = math.sqrt(f.var(ddof=1) / 64 + h.var(ddof=1) / 64)  # the normal-theory width, roughly
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)
    m = {"forget": list(rng.normal(1.5, 1.0, 64)), "holdout": list(h)}
    tg = {"forget": list(f - 1.0), "holdout": list(h)}
    rt = {"forget": list(f + 1.0), "holdout": list(h)}
    s = scaled_gap(m, tg, rt, n_boot=1000)
    assert s["ci"][0] < s["value"] < s["ci"][1]


def test_utility_bound_per_model():
    rec = lambda mode, model, kf, kr: {"mode": mode, "method": mode if model is None else "ga_gdr", "model": model,
                                       "precision": "bf16", "knowmem_f": kf, "knowmem_r": kr, "seed": 0}
    recs = [rec("target", "target", 80.0, 60.0), rec("retrain", "retrain", 10.0, 58.0),
            rec("full", "ga-full-s0", 20.0, 50.0), rec("full", "ga-full-s1", 15.0, 15.0),  # drops 1/6 and 3/4
            rec("lora", "ga-lora-s0", 30.0, 45.0), rec("lora", "ga-lora-s1", 30.0, 40.0)]  # 1/4 and 1/3
    s = sanity(recs, 0.5)
    full, lora = s["modes"]["full"], s["modes"]["lora"]
    assert [m["utility_drop"] for m in full["utility_per_model"]] == pytest.approx([1 / 6, 3 / 4])
    assert [m["holds"] for m in full["utility_per_model"]] == [True, False]
    # the mean drop (11/24 < 0.5) is within the bound, but one model is not: the bound does not hold
    assert full["utility_drop_mean"] == pytest.approx(11 / 24) and not full["utility_holds"]
    assert full["utility_models_within"] == 1 and lora["utility_holds"] and lora["utility_models_within"] == 2
    line = render_utility_line("full", full, s["utility_bound"])
    assert "within it for 1 of 2 models" in line and "ga-full-s1 75%" in line and "EXCEEDED" in line


def _records(shift_full: float, seeds=(0, 1, 2)):
    """Target / retrain / GA+GDR full and LoRA records at bf16 and nf4; full FT regains ``shift_full`` points
    of KnowMem_f at nf4 (plus a little seed noise), LoRA nothing."""
    out = []

    def rec(method, mode, seed, prec, kf, kr, model):
        items = [kf] * 4
        return {"method": method, "mode": mode, "seed": seed, "precision": prec, "model": model, "verbmem_f": 0.0,
                "knowmem_f": kf, "knowmem_r": kr, "privleak": -50.0, "items": {"knowmem_f": items,
                                                                              "knowmem_r": [kr] * 4}}
    for prec in ("bf16", "nf4"):
        out.append(rec("target", "target", None, prec, 80.0, 60.0, "target"))
        out.append(rec("retrain", "retrain", None, prec, 10.0, 58.0, "retrain"))
        for s in seeds:
            noise = 0.5 * (s - 1)
            out.append(rec("ga_gdr", "full", s, prec, 20.0 + (shift_full + noise if prec == "nf4" else 0), 55.0,
                           f"ga_gdr-full-s{s}"))
            out.append(rec("ga_gdr", "lora", s, prec, 25.0, 20.0 if s == 2 else 50.0, f"ga_gdr-lora-s{s}"))
    return out


def test_sweep_summary_and_render_name_holm_and_per_model_bound(tmp_path):
    from qru.demo.presets import get_preset
    from qru.demo.sweep import render_sweep, summarize_point, sweep_plots

    base = get_preset("quick", {"eval.precisions": "bf16,nf4"})
    results = [{"point": p, "knob": None if p == "centre" else "unlearn.epochs", "value": v, "records": recs,
                "summary": summarize_point(recs, ["nf4"], base.eval.utility_bound), "survival": {}}
               for p, v, recs in (("centre", None, _records(10.0)), ("unlearn.epochs=5", 5, _records(0.0)))]
    st = results[0]["summary"]["formats"]["nf4"]["full"]["restored"]
    assert st["effect"] == pytest.approx(10.0) and st["df"] == 2  # 3 seeds, no item noise (identical items)
    n = holm_family(results, ["nf4"])
    md = render_sweep(results, base, "quick", 0, {"unlearn.epochs": (5,)}, 1.0, (), n)
    assert "Holm's step-down correction" in md and f"family of {n} comparisons" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| centre |"))
    assert "3/3 / 2/3" in row  # LoRA seed 2 lost 2/3 of the target's utility: outside the 50% bound
    assert "+10.0*" in row  # the effect is shown after the correction
    assert results[0]["summary"]["sanity"]["modes"]["lora"]["utility_holds"] is False
    sweep_plots(results, base, tmp_path)
    assert (tmp_path / "sweep_restored.png").read_bytes()[:4] == b"\x89PNG"

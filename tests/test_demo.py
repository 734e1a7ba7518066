"""Integration test of ``qru demo`` on the ``mini`` preset (about 20 s once the C++ kernels are built): artifacts, results.json schema, the report's
table structure and numbers, the computed conclusion (recomputed here from results.json), the stage
cache (a second run computes nothing; a changed setting recomputes only what depends on it; --force
recomputes everything), and preset override errors."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from qru.cli import main
from qru.demo import PresetError, get_preset, parse_overrides
from qru.demo.pipeline import run_demo

MODES = {"full", "lora", "target", "retrain"}
KEYS = ("method", "mode", "precision", "verbmem_f", "knowmem_f", "knowmem_r", "privleak")
HEADER = ["Method", "Setting", "VerbMem_f ↓", "KnowMem_f ↓", "PrivLeak (→0)", "Utility (KnowMem_r) ↑"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "mini"
    cfg = get_preset("mini")
    run = run_demo(cfg, out, seed=0, progress=False, threads=1)
    return cfg, out, run


def _table(md: str, heading: str) -> list[list[str]]:
    sec = md.split(heading, 1)[1]
    lines = [ln for ln in sec.splitlines() if ln.startswith("|")]
    block = []
    for ln in sec.splitlines()[1:]:
        if ln.startswith("|"):
            block.append([c.strip() for c in ln.strip().strip("|").split("|")])
        elif block:
            break
    assert lines, f"no table after {heading!r}"
    return block


def test_artifacts(demo):
    cfg, out, run = demo
    for name in ("report.md", "results.json", "conclusions.json", "run.json"):
        assert (out / name).is_file(), name
    for name in ("precision_effect.png", "tradeoff.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    info = json.loads((out / "run.json").read_text())
    assert info["preset"] == "mini" and info["wall_seconds"] > 0
    assert "Wall time of this run" in (out / "report.md").read_text()


def test_results_schema(demo):
    cfg, out, run = demo
    recs = json.loads((out / "results.json").read_text())
    assert isinstance(recs, list) and recs
    for r in recs:
        for k in KEYS:
            assert k in r, k
        assert r["mode"] in MODES
        assert r["precision"] in cfg.eval.precisions
        for k in ("verbmem_f", "knowmem_f", "knowmem_r", "privleak"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r)
        for k in ("verbmem_f", "knowmem_f", "knowmem_r"):
            assert 0.0 <= r[k] <= 100.0
            assert statistics.fmean(r["items"][k]) == pytest.approx(r[k], abs=0.01)  # the metric = item mean
        assert r["head_quantized"] is False  # the default: lm_head left as bitsandbytes leaves it
        if r["mode"] in ("target", "retrain"):
            assert r["method"] == r["mode"]
        else:
            assert r["method"] in cfg.unlearn.methods
    n_models = 2 + cfg.unlearn.seeds * len(cfg.unlearn.methods) * len(cfg.unlearn.modes)
    assert len(recs) == n_models * len(cfg.eval.precisions)
    # every model at every precision, once
    keys = {(r.get("model"), r["precision"]) for r in recs}
    assert len(keys) == len(recs)
    # the retrain model's bf16 PrivLeak is 0 by definition (its own AUC is the reference)
    rb = [r for r in recs if r["mode"] == "retrain" and r["precision"] == "bf16"]
    assert rb[0]["privleak"] == pytest.approx(0.0, abs=1e-9)
    # quantized precisions really are quantized models (QuantLinear swapped in)
    for p in cfg.eval.precisions:
        st = json.loads(next((out / "stages").glob(f"eval-target-{p}-*/manifest.json")).read_text())
        mods = st["result"]["record"]["linear_modules"]
        assert ("QuantLinear" in mods) == (p != "bf16"), (p, mods)


def test_report_table(demo):
    cfg, out, run = demo
    md = (out / "report.md").read_text()
    recs = json.loads((out / "results.json").read_text())
    fmt = cfg.eval.table_format
    rows = _table(md, f"## Paper-style table (4-bit = {fmt})")
    assert rows[0] == HEADER
    body = rows[2:]
    labels = [(r[0], r[1]) for r in body]
    expected = [("Target", "Full (bf16)"), ("Target", f"4-bit ({fmt})"), ("Retrain", "Full (bf16)"),
                ("Retrain", f"4-bit ({fmt})")]
    expected += [("NPO+GDR", s) for s in ("Full", "Full+LoRA", "4-bit", "4-bit+LoRA")]
    assert labels == expected
    # cells equal the records (mean over seeds for unlearned rows)
    cols = {"VerbMem_f ↓": "verbmem_f", "KnowMem_f ↓": "knowmem_f", "PrivLeak (→0)": "privleak",
            "Utility (KnowMem_r) ↑": "knowmem_r"}
    setting = {"Full": ("full", "bf16"), "Full+LoRA": ("lora", "bf16"), "4-bit": ("full", fmt),
               "4-bit+LoRA": ("lora", fmt)}
    for row in body:
        if row[0] in ("Target", "Retrain"):
            mode, prec = row[0].lower(), "bf16" if row[1].startswith("Full") else fmt
            sel = [r for r in recs if r["mode"] == mode and r["precision"] == prec]
        else:
            mode, prec = setting[row[1]]
            sel = [r for r in recs if r["method"] == "npo_gdr" and r["mode"] == mode and r["precision"] == prec]
        for name, key in cols.items():
            cell = row[HEADER.index(name)]
            mean = statistics.fmean(r[key] for r in sel)
            assert float(cell.split(" ± ")[0]) == pytest.approx(mean, abs=0.051), (row, name)
    for heading in ("## Conclusion (computed from results.json)", "## Is this a real experiment?",
                    "## Every precision", "## Survival"):
        assert heading in md


def _recompute_effect(recs, metric, mode, prec):
    """Independent recomputation: per-seed mean paired difference; Student-t interval with k - 1 df for the
    seeds, combined with the eval-item noise (Welch-Satterthwaite); scipy's t distribution."""
    from scipy.stats import t as tdist

    by_seed, items = {}, []
    for r in recs:
        if r["mode"] == mode and r["precision"] == prec:
            base = [b for b in recs if b["model"] == r["model"] and b["precision"] == "bf16"][0]
            by_seed.setdefault(r["seed"], []).append(r[metric] - base[metric])
            items.append([x - y for x, y in zip(r["items"][metric], base["items"][metric])])
    d = [statistics.fmean(v) for v in by_seed.values()]
    k = len(d)
    effect, sd = statistics.fmean(d), statistics.stdev(d)
    se_s = sd / math.sqrt(k)
    per_item = [statistics.fmean(c) for c in zip(*items)]
    se_i = statistics.stdev(per_item) / math.sqrt(len(per_item))
    se = math.sqrt(se_s ** 2 + se_i ** 2)
    den = se_s ** 4 / (k - 1) + se_i ** 4 / (len(per_item) - 1)
    df = se ** 4 / den if den > 0 else k - 1  # no noise at all (e.g. every score 0): the seeds' df
    half = tdist.ppf(0.975, df) * se
    p = 2 * tdist.sf(abs(effect) / se, df) if se > 0 else (1.0 if effect == 0 else 0.0)
    return effect, sd, se, [effect - half, effect + half], p


def test_conclusion_matches_results(demo):
    cfg, out, run = demo
    recs = json.loads((out / "results.json").read_text())
    conc = json.loads((out / "conclusions.json").read_text())
    md = (out / "report.md").read_text()
    concl = md.split("## Conclusion (computed from results.json)", 1)[1].split("## Every precision", 1)[0]
    fmt = cfg.eval.table_format
    for mode, name in (("full", "Full fine-tuning"), ("lora", "LoRA (merged, then quantized)")):
        effect, sd, se, ci, p = _recompute_effect(recs, "knowmem_f", mode, fmt)
        st = conc["restore"][fmt][mode]
        assert st["effect"] == pytest.approx(effect, abs=1e-9)
        assert st["noise_sd"] == pytest.approx(sd, abs=1e-9)
        assert st["se"] == pytest.approx(se, abs=1e-9)
        assert st["ci"] == pytest.approx(ci, abs=1e-6) and st["p"] == pytest.approx(p, abs=1e-9)
        shown = p < 0.05 and abs(effect) >= conc["min_effect"]
        assert st["shown"] == shown
        line = next(ln for ln in concl.splitlines() if ln.startswith(f"- {name}:"))
        assert f"{effect:+.1f} points" in line
        assert ("YES" in line) == (shown and effect > 0)
        assert ("NO effect shown" in line) == (not shown)
    # utility at 4 bits: LoRA minus full, paired by (method, seed)
    pairs = []
    for r in recs:
        if r["mode"] == "lora" and r["precision"] == fmt:
            f = [x for x in recs if x["mode"] == "full" and x["precision"] == fmt and x["method"] == r["method"]
                 and x["seed"] == r["seed"]][0]
            pairs.append(r["knowmem_r"] - f["knowmem_r"])
    assert conc["utility"][fmt]["lora_minus_full"]["effect"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-9)
    assert "**2. Does LoRA keep more utility at 4 bits?**" in concl
    assert "**3. Where does PrivLeak move?**" in concl
    # sanity numbers are the records'; the utility bound is checked for every unlearned model
    tk = [r["knowmem_f"] for r in recs if r["mode"] == "target" and r["precision"] == "bf16"][0]
    assert conc["sanity"]["target_knowmem_f"] == tk
    ut = [r["knowmem_r"] for r in recs if r["mode"] == "target" and r["precision"] == "bf16"][0]
    for mode, v in conc["sanity"]["modes"].items():
        bf = {r["model"]: r for r in recs if r["mode"] == mode and r["precision"] == "bf16"}
        if ut == 0:  # no utility to lose (the mini model's scores are often 0): nothing to check against
            assert v["utility_per_model"] == [] and not v["utility_holds"]
            continue
        assert {m["model"] for m in v["utility_per_model"]} == set(bf)
        for m in v["utility_per_model"]:
            drop = (ut - bf[m["model"]]["knowmem_r"]) / ut
            assert m["utility_drop"] == pytest.approx(drop) and m["holds"] == (drop <= cfg.eval.utility_bound)
        assert v["utility_holds"] == all(m["holds"] for m in v["utility_per_model"])
        assert f"within it for {v['utility_models_within']} of {len(bf)} models" in md


def test_knowmem_f1_recall_and_min_k_gap(demo):
    cfg, out, run = demo
    recs = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    for r in recs:
        for k in ("knowmem_f", "knowmem_r"):  # F1 <= ... both in [0, 100]; recall kept beside F1
            assert 0.0 <= r[f"{k}_recall"] <= 100.0
    one = lambda mode: [r for r in recs if r["mode"] == mode and r["precision"] == "bf16"][0]
    assert one("target")["min_k_gap"] == pytest.approx(1.0) and one("retrain")["min_k_gap"] == pytest.approx(0.0)
    for r in recs:
        lo, hi = r["min_k_gap_ci"]
        assert lo - 1e-9 <= r["min_k_gap"] <= hi + 1e-9
        t, rt = one("target")["min_k_gap_raw"], one("retrain")["min_k_gap_raw"]
        assert r["min_k_gap"] == pytest.approx((r["min_k_gap_raw"] - rt) / (t - rt))
    assert "Min-40% gap, scaled" in md
    # mini lowers the generation lengths, and its report says so
    assert cfg.eval.verbmem_tokens < 128 and "lowered by this preset" in md


def test_cache_reuse_changed_setting_and_force(demo, tmp_path):
    cfg, out, run = demo
    before = json.loads((out / "results.json").read_text())
    again = run_demo(cfg, out, seed=0, progress=False, threads=1)
    assert again.computed == [] and len(again.cached) == len(run.computed)
    assert json.loads((out / "results.json").read_text()) == before
    # a changed unlearning setting recomputes only the full-FT unlearning and what depends on it
    changed = get_preset("mini", {"unlearn.lr_full": 2e-4})
    part = run_demo(changed, out, seed=0, progress=False, threads=1)
    assert part.computed and all(n.startswith(("unlearn-npo_gdr-full", "eval-npo_gdr-full",
                                               "survival-npo_gdr-full")) for n in part.computed), part.computed
    assert "base" in part.cached and "target" in part.cached
    # --force through the CLI recomputes every stage
    rc = main(["demo", "--preset", "mini", "--out", str(out), "--force", "--no-progress", "--threads", "1"])
    assert rc == 0
    info = json.loads((out / "run.json").read_text())
    assert info["cached"] == [] and {"corpus", "tokenizer", "base", "target", "retrain"} <= set(info["computed"])
    assert json.loads((out / "results.json").read_text()) == before  # deterministic


def test_preset_errors():
    with pytest.raises(PresetError, match="model.nope"):
        get_preset("quick", {"model.nope": 1})
    with pytest.raises(PresetError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(PresetError, match="expected an integer"):
        get_preset("quick", {"model.hidden": "wide"})
    with pytest.raises(PresetError, match="unlearn.methods"):
        get_preset("quick", {"unlearn.methods": "ga_xyz"})
    with pytest.raises(PresetError, match="SECTION.FIELD=VALUE"):
        parse_overrides(["model.hidden"])
    assert get_preset("quick", parse_overrides(["model.hidden=128"])).model.hidden == 128
    assert main(["demo", "--preset", "mini", "--set", "eval.limit=0", "--out", "/nonexistent/x"]) == 2

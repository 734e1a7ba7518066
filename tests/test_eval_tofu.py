"""TOFU evaluation on forget01 / retain_perturbed with a tiny random model: per-item losses
against a direct forward pass, aggregation against numpy/scipy, and ``qru eval --benchmark tofu``."""
import json
import math

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp

from qru.eval import tofu

LIMIT = 3


@pytest.fixture(scope="module")
def result(model_tok, shared_data):
    model, tok = model_tok
    return tofu.evaluate_tofu(model, tok, shared_data / "tofu", forget_split="forget01",
                              retain_split="retain_perturbed", limit=LIMIT, batch_size=4, max_new_tokens=24)


def _answer_loss(model, tok, question, answer):
    """Mean NLL of the answer tokens, from one unbatched forward pass."""
    prompt = tofu.TEMPLATE.format(question=question)
    ids, pids = tok.encode(prompt + answer), tok.encode(prompt)
    start = next(i for i, (a, b) in enumerate(zip(ids, pids + [-1])) if a != b)
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return -lsm[start - 1:-1].gather(-1, torch.tensor(ids[start:])[:, None]).mean().item()


def test_tofu_items_match_direct_computation(result, model_tok, shared_data):
    model, tok = model_tok
    items = tofu.load_split(shared_data / "tofu", "forget01")[:LIMIT]
    ratios = []
    for d, it in zip(items, result["items"]["forget"]):
        gl = _answer_loss(model, tok, d["question"], d["answer"])
        pl = _answer_loss(model, tok, d["question"], d["paraphrased_answer"])
        pe = [_answer_loss(model, tok, d["question"], a) for a in d["perturbed_answer"]]
        assert it["gt_loss"] == pytest.approx(gl, abs=1e-4)
        assert it["paraphrased_loss"] == pytest.approx(pl, abs=1e-4)
        assert it["perturbed_loss"] == pytest.approx(pe, abs=1e-4)
        assert it["prob"] == pytest.approx(math.exp(-gl), rel=1e-4)
        r = math.exp(np.mean(pe) - pl)
        assert it["truth_ratio"] == pytest.approx(r, rel=1e-4)
        ratios.append(r)
    assert result["forget_truth_ratio"] == pytest.approx(np.mean([min(r, 1 / r) for r in ratios]), rel=1e-4)
    assert result["forget_prob"] == pytest.approx(np.mean([it["prob"] for it in result["items"]["forget"]]))


def test_tofu_aggregates(result):
    retain = result["items"]["retain"]
    r = [it["truth_ratio"] for it in retain]
    assert result["retain_truth_ratio"] == pytest.approx(np.mean([max(0, 1 - 1 / x) for x in r]))
    assert result["retain_rouge"] == pytest.approx(np.mean([it["rougeL_r"] for it in retain]))
    assert result["model_utility"] == pytest.approx(
        hmean([result["retain_prob"], result["retain_rouge"], result["retain_truth_ratio"]])
        if min(result["retain_prob"], result["retain_rouge"], result["retain_truth_ratio"]) > 0 else 0.0)
    assert result["utility_sets"] == ["retain"] and result["forget_quality"] is None
    assert result["n_items"] == {"forget": LIMIT, "retain": LIMIT}
    assert result["throughput"]["tokens_per_s"] > 0


def test_tofu_rouge_is_recall_with_stemmer(result, shared_data):
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    items = tofu.load_split(shared_data / "tofu", "retain_perturbed")[:LIMIT]
    for d, it in zip(items, result["items"]["retain"]):
        assert it["rougeL_r"] == pytest.approx(ref.score(d["answer"], it["output"])["rougeL"].recall)


def test_forget_quality_against_retain_model(model_tok, shared_data, result):
    model, tok = model_tok
    own = tofu.forget_truth_ratios(model, tok, shared_data / "tofu", forget_split="forget01", limit=LIMIT)
    np.testing.assert_allclose(own, result["forget_truth_ratios"], rtol=1e-5)
    other = [0.5, 1.5, 3.0]
    r = tofu.evaluate_tofu(model, tok, shared_data / "tofu", forget_split="forget01", limit=LIMIT,
                           retain_truth_ratios=other, max_new_tokens=4)
    ref = ks_2samp(r["forget_truth_ratios"], other)
    assert r["forget_quality"] == pytest.approx(ref.pvalue) and r["ks_stat"] == pytest.approx(ref.statistic)
    with pytest.raises(ValueError, match="retain_truth_ratios has 2 values"):
        tofu.evaluate_tofu(model, tok, shared_data / "tofu", forget_split="forget01", limit=LIMIT,
                           retain_truth_ratios=[1.0, 2.0])


def test_cli_eval_tofu(tiny_dir, shared_data, tmp_path, capsys):
    from qru.cli import main

    out = tmp_path / "tofu.json"
    rc = main(["eval", str(tiny_dir), "--benchmark", "tofu", "--data", str(shared_data / "tofu"),
               "--forget-split", "forget01", "--retrain-model", str(tiny_dir), "--limit", "2", "--out", str(out),
               "--precision", "fp32"])
    assert rc == 0
    assert "ForgetQ" in capsys.readouterr().out
    res = json.loads(out.read_text())
    (rec,) = res["records"]
    # the retain model is the model itself: the same truth ratios (up to batching round-off), KS p-value 1
    np.testing.assert_allclose(res["retrain"]["retain_truth_ratios"], rec["forget_truth_ratios"], rtol=1e-5)
    assert rec["forget_quality"] == pytest.approx(1.0)
    assert rec["precision"] == "fp32" and rec["benchmark"] == "tofu" and "qru_version" in rec
    assert main(["eval", str(tiny_dir), "--benchmark", "tofu", "--data", str(shared_data / "tofu"),
                 "--forget-split", "forget05", "--out", str(tmp_path / "tofu5.json")]) == 2
    assert "forget05" in capsys.readouterr().err

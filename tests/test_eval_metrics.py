"""qru.eval metric oracles (rouge-score, sklearn, scipy, hand-computed values), exact prompt
strings, data validation errors. No model needed."""
import json
import math
import zlib

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp
from sklearn.metrics import auc, roc_auc_score, roc_curve

from qru.eval import muse, tofu
from qru.eval.common import (EvalDataError, SequenceScore, auc_forget_holdout, load_records, membership_scores,
                             min_k, rouge_l, token_stats)
from qru.eval.precision import PRECISIONS, check_available, parse_precisions
from qru.model.generate import cut_at_stop

# -- ROUGE ----------------------------------------------------------------------------------

PAIRS = [
    ("the cat sat on the mat", "the cat on the mat"),
    ("1472", "It was 1472, I think"),
    ("Dame Alison Rose", "dame alison"),
    ("£55,000", "55,000 pounds"),
    ("The author's full name is Hsiao Yun-Hwa.", "Hsiao Yun-Hwa is the complete name of the writer."),
    ("writing books", "writes books"),
    ("anything", ""),
]


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_l_matches_rouge_score(stem):
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
    for gt, pred in PAIRS:
        s = ref.score(gt, pred)["rougeL"]
        assert rouge_l(gt, pred, use_stemmer=stem) == (s.fmeasure, s.recall)


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; P = 5/5, R = 5/6
    f, r = rouge_l("the cat sat on the mat", "the cat on the mat")
    assert r == pytest.approx(5 / 6)
    assert f == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l("writing books", "writes books", use_stemmer=True)[1] == pytest.approx(1.0)
    assert rouge_l("writing books", "writes books")[1] == pytest.approx(0.5)


# -- prompts ----------------------------------------------------------------------------------

def test_knowmem_prompt_exact():
    icl = [("Who won?", "Alice"), ("When?\n", "In 1990 ")]
    assert muse.knowmem_prompt("What year?", icl) == (
        "Question: Who won?\nAnswer: Alice\n\n"
        "Question: When?\n\nAnswer: In 1990 \n\n"
        "Question: What year?\nAnswer: ")
    assert muse.knowmem_prompt("Q", []) == "Question: Q\nAnswer: "


def test_knowmem_prompt_on_shared_icl(shared_data):
    icl = json.load(open(shared_data / "muse-news" / "knowmem" / "forget_qa_icl.json"))
    p = muse.knowmem_prompt("Why?", [(d["question"], d["answer"]) for d in icl])
    assert p.startswith(f"Question: {icl[0]['question']}\nAnswer: {icl[0]['answer']}\n\nQuestion: ")
    assert p.endswith(f"Answer: {icl[-1]['answer']}\n\nQuestion: Why?\nAnswer: ")
    assert p.count("Question: ") == len(icl) + 1


@pytest.mark.parametrize("text,expected", [
    ("1472\n\nQuestion: next", "1472"),
    ("Alice\nQuestion: x", "Alice"),
    ("Bob Question: x", "Bob "),
    ("no stop at all", "no stop at all"),
    ("a\nQuestion\n\nb", "a"),
    ("x\n\ny\nQuestion", "x"),
    ("", ""),
])
def test_cut_answer(text, expected):
    assert muse.cut_answer(text) == expected
    # generate() cuts at the earliest stop: the same prefix as the reference's sequential split
    assert cut_at_stop(text, muse.KNOWMEM_STOP) == expected


def test_tofu_template():
    assert tofu.TEMPLATE.format(question="Who?") == "Question: Who?\nAnswer: "


# -- Min-K%, Min-K%++, zlib, AUC ---------------------------------------------------------------

def test_min_k_hand_computed():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert min_k(lp, 0.4) == pytest.approx(4.5)   # lowest 2 of 5: (-5 - 4) / 2 -> 4.5
    assert min_k(lp, 1.0) == pytest.approx(3.0)
    assert min_k(lp, 0.1) == pytest.approx(5.0)   # int(0.5) = 0 -> at least one token
    assert min_k([-0.7, -0.1, -2.3, -0.2, -0.4, -1.1, -0.9, -3.0, -0.5, -0.6], 0.4) == pytest.approx(
        (3.0 + 2.3 + 1.1 + 0.9) / 4)
    with pytest.raises(ValueError, match="k must be"):
        min_k(lp, 0.0)
    with pytest.raises(ValueError, match="empty"):
        min_k([], 0.4)


def test_token_stats_hand_distribution():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]], dtype=torch.float64)
    logits = p.log() + 3.0  # shift: softmax-invariant
    targets = torch.tensor([1, 2])
    lp, z = token_stats(logits, targets)
    for t in range(2):
        pr = p[t].tolist()
        mu = sum(q * math.log(q) for q in pr)
        var = sum(q * math.log(q) ** 2 for q in pr) - mu ** 2
        x = math.log(pr[targets[t]])
        assert lp[t].item() == pytest.approx(x, abs=1e-6)
        assert z[t].item() == pytest.approx((x - mu) / math.sqrt(var), abs=1e-5)
    # a flat distribution has sigma = 0: z stays finite (0)
    lp, z = token_stats(torch.zeros(1, 4), torch.tensor([2]))
    assert lp.item() == pytest.approx(-math.log(4)) and z.item() == 0.0


def test_membership_scores_hand():
    s = SequenceScore(np.array([-1.0, -2.0, -3.0, -4.0, -5.0]), np.array([0.5, -1.0, 2.0, -3.0, 0.0]))
    text = "some text some text some text"
    m = membership_scores(s, text, k=0.4)
    assert m["PPL"] == pytest.approx(3.0)
    assert m["PPL/zlib"] == pytest.approx(3.0 / len(zlib.compress(text.encode())))
    assert m["Min-40%"] == pytest.approx(4.5)
    assert m["Min-40%++"] == pytest.approx(2.0)  # lowest two z: -3, -1
    assert m["n_tokens"] == 5


def test_auc_matches_sklearn_and_muse_orientation():
    rng = np.random.default_rng(0)
    forget, holdout = rng.normal(2.0, 1.0, 37), rng.normal(2.5, 1.0, 41)
    forget[:5] = holdout[:5]  # ties
    got = auc_forget_holdout(forget, holdout)
    # MUSE: y = [0]*forget + [1]*holdout, roc_curve(y, -score), auc(fpr, tpr)
    y = np.r_[np.zeros(37), np.ones(41)]
    score = np.r_[forget, holdout]
    fpr, tpr, _ = roc_curve(y, -score)
    assert got == pytest.approx(auc(fpr, tpr), abs=1e-12)
    assert got == pytest.approx(roc_auc_score(y, -score), abs=1e-12)
    # orientation: a model that memorised the forget set (low Min-K scores there) -> AUC near 0
    assert auc_forget_holdout([0.1, 0.2, 0.3], [3.0, 4.0, 5.0]) == 0.0
    assert auc_forget_holdout([3.0, 4.0], [0.1, 0.2]) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        auc_forget_holdout([], [1.0])


def test_privleak_formula_and_retrain_auc_checks():
    assert muse.privleak_from_auc(0.25, 0.5) == pytest.approx(-50.0)
    assert muse.privleak_from_auc(0.4772, 0.4772) == 0.0
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match="retrain AUC"):
            muse.check_retrain_auc(bad)


# -- TOFU -------------------------------------------------------------------------------------

def test_truth_ratio_hand_computed():
    para = [1.0, 2.0]
    pert = [[2.0, 4.0], [1.0, 1.0, 1.0]]
    r = tofu.truth_ratio_values(para, pert)
    assert r == pytest.approx([math.exp(2.0), math.exp(-1.0)])
    assert tofu.truth_ratio_stat(r, forget=True) == pytest.approx((math.exp(-2.0) + math.exp(-1.0)) / 2)
    assert tofu.truth_ratio_stat(r, forget=False) == pytest.approx((1 - math.exp(-2.0) + 0.0) / 2)


def test_forget_quality_matches_ks_2samp():
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(0, 1, 40), rng.lognormal(0.5, 1, 40)
    p, stat = tofu.forget_quality(a, b)
    ref = ks_2samp(a, b)
    assert (p, stat) == (pytest.approx(ref.pvalue), pytest.approx(ref.statistic))
    assert tofu.forget_quality(a, a)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-empty"):
        tofu.forget_quality([], a)


def test_harmonic_mean_matches_scipy():
    v = [0.3, 0.9, 0.05, 0.5]
    assert tofu.harmonic_mean(v) == pytest.approx(hmean(v))
    assert tofu.harmonic_mean([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError):
        tofu.harmonic_mean([])


def test_tofu_forget01_gets_perturbed_from_forget10(shared_data):
    items = tofu.load_split(shared_data / "tofu", "forget01")
    f10 = {d["question"]: d for d in tofu.load_split(shared_data / "tofu", "forget10")}
    assert len(items) == 40
    for d in items:
        assert d["perturbed_answer"] == f10[d["question"]]["perturbed_answer"]
        assert d["paraphrased_answer"] == f10[d["question"]]["paraphrased_answer"]
        assert len(d["perturbed_answer"]) == 5
    retain = tofu.load_split(shared_data / "tofu", "retain_perturbed")
    assert len(retain) == 400 and all(isinstance(d["perturbed_answer"], list) for d in retain)


def test_tofu_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="forget05"):
        tofu.load_split(tmp_path, "forget05")
    (tmp_path / "f.json").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(EvalDataError, match="perturbed_answer"):
        tofu.load_split(tmp_path, "f")


# -- data validation --------------------------------------------------------------------------

def test_load_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_records(tmp_path / "nope.json")
    p = tmp_path / "x.json"
    p.write_text("[]")
    with pytest.raises(EvalDataError, match="empty list"):
        load_records(p)
    p.write_text("")
    with pytest.raises(EvalDataError, match="empty file"):
        load_records(p)
    p.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(EvalDataError, match=r"item 0 has no field 'answer'"):
        load_records(p, ("question", "answer"))
    p.write_text(json.dumps([{"question": "q", "answer": 3}]))
    with pytest.raises(EvalDataError, match="'answer' must be a string"):
        load_records(p, ("question", "answer"))
    p.write_text('{"question": "q", "answer": "a"}\n{broken\n')
    with pytest.raises(EvalDataError, match="line 2"):
        load_records(p, ("question", "answer"))
    p.write_text('{"question": "q", "answer": "a"}\n\n{"question": "r", "answer": "b"}\n')
    assert [d["question"] for d in load_records(p, ("question", "answer"))] == ["q", "r"]
    p.write_text(json.dumps(["t1", "t2"]))
    assert load_records(p, allow_str=True) == ["t1", "t2"]
    with pytest.raises(EvalDataError, match="item 0 is a str"):
        load_records(p, ("text",))


def test_muse_missing_file_named(shared_data, tmp_path):
    assert set(muse.resolve_files(shared_data / "muse-news")) == set(muse.DEFAULT_FILES)
    (tmp_path / "knowmem").mkdir()
    with pytest.raises(FileNotFoundError, match=r"verbmem/forget\.json"):
        muse.resolve_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"knowmem/retain_qa\.json"):
        muse.resolve_files(tmp_path, ["knowmem_r"])
    with pytest.raises(FileNotFoundError, match="data directory"):
        muse.resolve_files(tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown MUSE metric"):
        muse.resolve_files(shared_data / "muse-news", ["verbmem_x"])


def test_precisions_parse_and_availability():
    assert parse_precisions("bf16, int8,nf4,bfloat16") == ["bf16", "int8", "nf4"]
    assert parse_precisions(["FP32"]) == ["fp32"]
    assert set(PRECISIONS) >= {"fp32", "bf16", "int8", "nf4", "fp4", "int4", "int4_sym"}
    with pytest.raises(ValueError, match="int3"):
        parse_precisions("bf16,int3")
    with pytest.raises(ValueError, match="no precision"):
        parse_precisions(" , ")
    check_available(["fp32", "bf16", "int8", "nf4"])
    with pytest.raises(FileNotFoundError, match="no-such-adapter"):
        check_available(["bf16"], adapter="no-such-adapter")


def test_score_batches_respect_rows_and_token_budget():
    from qru.eval.common import _batches

    lengths = [100, 90, 50, 50, 10, 10, 10, 3]
    order = list(range(len(lengths)))
    got = _batches(order, lengths, 3, 200)
    assert got == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert sorted(i for b in got for i in b) == order
    for b in got:
        assert len(b) <= 3 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 200)
    assert _batches(order, lengths, 3, None) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert _batches([0], [5000], 8, 100) == [[0]]  # a long row still gets scored alone
    assert _batches([0, 1, 2], [512, 512, 512], 8, 1024) == [[0, 1], [2]]

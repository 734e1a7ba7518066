"""MUSE evaluation on the shared data with a tiny random model: batched scoring against an
unbatched oracle, metric aggregation against rouge-score / sklearn on the logged items,
precisions, and the ``qru eval`` command end to end."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score

from qru.eval import muse
from qru.eval.common import score_ids, score_sequences
from qru.eval.precision import build_model, eval_at_precisions
from qru.model.llama import Llama
from qru.model.tokenizer import Tokenizer

LIMIT = 3
MAX_LEN = 160


@pytest.fixture(scope="module")
def muse_result(model_tok, shared_data):
    model, tok = model_tok
    return muse.evaluate_muse(model, tok, shared_data / "muse-news", retrain_auc=0.4772, limit=LIMIT,
                              batch_size=4, score_batch_size=4, max_len=MAX_LEN)


def _oracle_logprobs(model, ids, start):
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].float()
    lsm = torch.log_softmax(logits, -1)
    lp = lsm[start - 1:-1].gather(-1, torch.tensor(ids[start:])[:, None]).squeeze(-1)
    p = lsm.exp()
    mu = (p * lsm).sum(-1)[start - 1:-1]
    sd = ((p * lsm ** 2).sum(-1)[start - 1:-1] - mu ** 2).sqrt()
    return lp.double().numpy(), ((lp - mu) / sd).double().numpy()


def test_score_sequences_matches_unbatched_oracle(model_tok, shared_data):
    model, tok = model_tok
    texts = json.load(open(shared_data / "muse-news" / "privleak" / "holdout.json"))[:3]
    texts = [texts[0][:300], texts[1][:50], texts[2][:900], "Short one."]  # awkward, unequal lengths
    got = score_sequences(model, tok, texts, batch_size=3, max_len=MAX_LEN)
    for t, s in zip(texts, got):
        ids = tok.encode(t, bos=True)[:MAX_LEN]
        lp, z = _oracle_logprobs(model, ids, 1)
        assert s.n_tokens == len(ids) - 1
        np.testing.assert_allclose(s.logprobs, lp, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(s.zscores, z, atol=2e-4, rtol=1e-4)
        assert s.loss == pytest.approx(-lp.mean(), abs=1e-5)


def test_score_with_prompts_scores_only_the_answer(model_tok):
    model, tok = model_tok
    prompts = ["Question: Who wrote it?\nAnswer: ", "Question: When?\nAnswer: "]
    answers = ["The author is Basil Mahfouz Al-Kuwaiti.", "In 1956"]
    texts = [p + a for p, a in zip(prompts, answers)]
    got = score_sequences(model, tok, texts, batch_size=2, prompts=prompts, stats=False)
    for p, t, s in zip(prompts, texts, got):
        ids, pids = tok.encode(t), tok.encode(p)
        start = next(i for i, (a, b) in enumerate(zip(ids, pids + [-1])) if a != b)
        lp, _ = _oracle_logprobs(model, ids, start)
        assert s.zscores is None and s.n_tokens == len(ids) - start
        np.testing.assert_allclose(s.logprobs, lp, atol=2e-5, rtol=1e-5)
        assert tok.decode(ids[start:]).strip() == t[len(p):].strip()[:len(tok.decode(ids[start:]).strip())]
    with pytest.raises(ValueError, match="start"):
        score_ids(model, [[1, 5, 6]], [0])


def test_muse_on_shared_data(muse_result, model_tok, shared_data):
    r = muse_result
    _, tok = model_tok
    assert r["n_items"] == {"verbmem_f": LIMIT, "knowmem_f": LIMIT, "knowmem_r": LIMIT, "privleak": 2 * LIMIT}
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    # VerbMem: mean ROUGE-L F1 x100 against gt cut to 128 tokens (BOS counted, as the reference)
    data = json.load(open(shared_data / "muse-news" / "verbmem" / "forget.json"))[:LIMIT]
    f1 = []
    for d, it in zip(data, r["items"]["verbmem_f"]):
        gt = tok.decode(tok.encode(d["gt"], bos=True)[:128])
        assert it["gt"] == gt and d["gt"].startswith(gt[:20])
        f1.append(ref.score(gt, it["output"])["rougeL"].fmeasure)
    assert r["verbmem_f"] == pytest.approx(100 * np.mean(f1))
    # KnowMem: ROUGE-L F1 x100 of the cut answer (MUSE's mean_rougeL); recall x100 beside it
    for key, name in (("knowmem_f", "forget_qa"), ("knowmem_r", "retain_qa")):
        qa = json.load(open(shared_data / "muse-news" / "knowmem" / f"{name}.json"))[:LIMIT]
        items = r["items"][key]
        assert [it["answer"] for it in items] == [d["answer"] for d in qa]
        f1, rec = [], []
        for it in items:
            assert not any(s in it["output"] for s in muse.KNOWMEM_STOP)
            s = ref.score(it["answer"], it["output"])["rougeL"]
            f1.append(s.fmeasure)
            rec.append(s.recall)
        assert r[key] == pytest.approx(100 * np.mean(f1))
        assert r[f"{key}_recall"] == pytest.approx(100 * np.mean(rec))
        assert 0 <= r[key] <= 100
    # PrivLeak: sklearn AUC on the logged Min-40% scores, MUSE orientation, then the formula
    f = [d["Min-40%"] for d in r["items"]["privleak"]["forget"]]
    h = [d["Min-40%"] for d in r["items"]["privleak"]["holdout"]]
    y = [0] * len(f) + [1] * len(h)
    assert r["auc"] == pytest.approx(roc_auc_score(y, -np.array(f + h)))
    assert r["privleak"] == pytest.approx((r["auc"] - 0.4772) / 0.4772 * 100)
    # the Min-40% gap (holdout minus forget score) with its bootstrap interval around it
    g = r["min_k_gap"]
    assert g["gap"] == pytest.approx(np.mean(h) - np.mean(f)) and g["ci"][0] <= g["gap"] <= g["ci"][1]
    assert set(r["aucs"]) == {"PPL", "PPL/zlib", "Min-40%", "Min-40%++"}
    assert all(d["n_tokens"] == MAX_LEN - 1 for d in r["items"]["privleak"]["forget"])
    th = r["throughput"]
    assert th["tokens"] > 0 and th["tokens_per_s"] > 0
    assert set(th["stages"]) == {"verbmem_f", "knowmem_f", "knowmem_r", "privleak"}


def test_batched_generation_equals_one_by_one(model_tok, shared_data, muse_result):
    model, tok = model_tok
    r1 = muse.evaluate_muse(model, tok, shared_data / "muse-news", limit=LIMIT, batch_size=1,
                            metrics=["knowmem_f", "verbmem_f"])
    for key in ("knowmem_f", "verbmem_f"):
        assert [x["output"] for x in r1["items"][key]] == [x["output"] for x in muse_result["items"][key]]
    assert r1["privleak"] is None and r1["auc"] is None


def test_muse_synthetic_corpus_text_objects(model_tok, tmp_path):
    """The demo writes its own corpus in MUSE layout; privleak items may be {"text": ...}."""
    model, tok = model_tok
    qa = [{"question": f"What is item {i}?", "answer": f"Item {i} is a thing."} for i in range(3)]
    files = {"verbmem/forget.json": [{"prompt": "Once upon a time", "gt": "there was a model."}] * 2,
             "knowmem/forget_qa.json": qa, "knowmem/forget_qa_icl.json": qa[:1],
             "knowmem/retain_qa.json": qa, "knowmem/retain_qa_icl.json": qa[:2],
             "privleak/forget.json": [{"text": "alpha beta gamma delta"}, "epsilon zeta eta theta"],
             "privleak/holdout.json": ["one two three four five", "six seven eight"],
             "privleak/retain.json": ["unused"]}
    for name, obj in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(obj))
    r = muse.evaluate_muse(model, tok, tmp_path, retrain_auc=0.5, verbmem_max_new_tokens=8,
                           knowmem_max_new_tokens=8)
    assert r["n_items"]["privleak"] == 4 and 0 <= r["auc"] <= 1
    (tmp_path / "privleak/holdout.json").write_text(json.dumps(["ok", ""]))
    with pytest.raises(ValueError, match=r"holdout\.json: item 1 is an empty text"):
        muse.evaluate_muse(model, tok, tmp_path, metrics=["privleak"])
    (tmp_path / "knowmem/forget_qa.json").write_text("[]")
    with pytest.raises(ValueError, match=r"forget_qa\.json: empty list"):
        muse.evaluate_muse(model, tok, tmp_path, metrics=["knowmem_f"])
    with pytest.raises(ValueError, match="retrain AUC"):
        muse.evaluate_muse(model, tok, tmp_path, retrain_auc=1.2)


def test_precisions_fp32_bf16(tiny_dir, shared_data):
    def fn(model, precision):
        assert model.model.embed_tokens.weight.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        return muse.evaluate_muse(model, Tokenizer.from_dir(tiny_dir), shared_data / "muse-news", limit=2,
                                  metrics=["knowmem_f", "privleak"], max_len=64, knowmem_max_new_tokens=8)
    recs = eval_at_precisions(tiny_dir, None, "fp32,bf16", fn)
    assert [r["precision"] for r in recs] == ["fp32", "bf16"]
    for r in recs:
        assert 0 <= r["auc"] <= 1 and math.isfinite(r["knowmem_f"])
    # bf16 scores are close to fp32 ones on the same texts
    a = [d["PPL"] for d in recs[0]["items"]["privleak"]["forget"]]
    b = [d["PPL"] for d in recs[1]["items"]["privleak"]["forget"]]
    np.testing.assert_allclose(a, b, rtol=0.05)


def test_quantized_precisions_evaluate(tiny_dir, shared_data):
    tok = Tokenizer.from_dir(tiny_dir)
    recs = eval_at_precisions(tiny_dir, None, "int8,nf4", lambda m, p: muse.evaluate_muse(
        m, tok, shared_data / "muse-news", limit=2, metrics=["privleak"], max_len=64))
    assert all(0 <= r["auc"] <= 1 for r in recs)


# -- CLI ----------------------------------------------------------------------------------------

def _run_cli(argv):
    from qru.cli import main

    return main(argv)


def test_cli_eval_muse(tiny_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "res" / "muse.json"
    rc = _run_cli(["eval", str(tiny_dir), "--benchmark", "muse", "--data", str(shared_data / "muse-news"),
                   "--retrain-model", str(tiny_dir), "--limit", "2", "--max-len", "96", "--out", str(out),
                   "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "VerbMem_f" in printed and "PrivLeak" in printed and "tok/s" in printed and "fp32" in printed
    res = json.loads(out.read_text())
    (rec,) = res["records"]
    for k in ("precision", "verbmem_f", "knowmem_f", "knowmem_r", "privleak", "auc", "items", "model", "data",
              "qru_version", "seed", "throughput"):
        assert k in rec, k
    assert rec["precision"] == "fp32" and rec["seed"] == 3 and rec["model"] == str(tiny_dir)
    # the retrain model is the model itself: same AUC, PrivLeak exactly 0
    assert res["retrain"]["retrain_auc"] == pytest.approx(rec["auc"]) and rec["privleak"] == pytest.approx(0.0)
    assert rec["throughput"]["tokens_per_s"] > 0
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_eval_errors(tiny_dir, shared_data, tmp_path, capsys):
    data = tmp_path / "muse"
    shutil.copytree(shared_data / "muse-news" / "knowmem", data / "knowmem")
    base = ["eval", str(tiny_dir), "--benchmark", "muse", "--out", str(tmp_path / "r.json")]
    assert _run_cli(base + ["--data", str(data)]) == 2
    assert "verbmem/forget.json" in capsys.readouterr().err
    assert _run_cli(base + ["--data", str(shared_data / "muse-news"), "--retrain-auc", "1.5"]) == 2
    assert "retrain AUC must be a number in (0, 1)" in capsys.readouterr().err
    assert _run_cli(base + ["--data", str(shared_data / "muse-news"), "--precision", "int3"]) == 2
    assert "unknown precision" in capsys.readouterr().err
    assert _run_cli(base + ["--data", str(shared_data / "muse-news"), "--adapter", str(tmp_path / "nope")]) == 2
    assert "adapter" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_shared_prefix_generation_matches_generate(model_tok, shared_data, monkeypatch):
    from qru.eval import generation
    from qru.eval.generation import generate_batched
    from qru.model.generate import generate

    shared = []
    real = generation._shared_prefix_batch
    monkeypatch.setattr(generation, "_shared_prefix_batch",
                        lambda m, t, rows, p, *a: shared.append((len(rows), p)) or real(m, t, rows, p, *a))

    model, tok = model_tok
    icl = json.load(open(shared_data / "muse-news" / "knowmem" / "retain_qa_icl.json"))[:4]
    qa = json.load(open(shared_data / "muse-news" / "knowmem" / "retain_qa.json"))[:5]
    prompts = [muse.knowmem_prompt(d["question"], [(x["question"], x["answer"]) for x in icl]) for d in qa]
    prompts.append("An unrelated prompt.")  # lands in a batch with no shared prefix -> generate()
    for stop in ((), muse.KNOWMEM_STOP):
        ref = generate(model, tok, prompts, max_new_tokens=12, stop=stop, batch_size=1)
        assert generate_batched(model, tok, prompts, 12, stop=stop, batch_size=4) == ref
        assert generate_batched(model, tok, prompts, 12, stop=stop, batch_size=6, min_shared=1) == ref
    assert generate_batched(model, tok, prompts[:1], 5) == generate(model, tok, prompts[:1], max_new_tokens=5)
    # batch of 4 holds the unrelated prompt (fallback); batch of 2 shares the ICL prefix; min_shared=1 shares BOS
    assert [n for n, _ in shared] == [2, 6, 2, 6] and shared[0][1] > 100 and shared[1][1] == 1
    with pytest.raises(ValueError, match="batch_size"):
        generate_batched(model, tok, prompts, 5, batch_size=0)


def test_adapter_merged_before_precision(tiny_dir, tmp_path, shared_data):
    """--adapter: the PEFT adapter is merged in fp32; the built model reproduces the LoRA model."""
    from qru.model.lora import apply_lora, lora_modules, save_adapter

    lora_model = Llama.from_pretrained(tiny_dir)
    apply_lora(lora_model, r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(lora_model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)
    adapter = save_adapter(lora_model.eval(), tmp_path / "adapter")
    ids = torch.randint(4, 500, (2, 17), generator=g)
    with torch.no_grad():
        want = lora_model(ids)
        base = Llama.from_pretrained(tiny_dir).eval()(ids)
        got = build_model(tiny_dir, "fp32", adapter)(ids)
    assert (want - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # bf16: merged in fp32 first, then cast (merge-then-quantize order)
    sd32 = build_model(tiny_dir, "fp32", adapter).state_dict()
    sd16 = build_model(tiny_dir, "bf16", adapter).state_dict()
    assert sd16.keys() == sd32.keys()
    for k in sd32:
        assert sd16[k].dtype == torch.bfloat16 and torch.equal(sd16[k], sd32[k].to(torch.bfloat16)), k
    assert not any(True for _ in lora_modules(build_model(tiny_dir, "fp32", adapter)))
    from qru.cli import main

    out = tmp_path / "a.json"
    assert main(["eval", str(tiny_dir), "--adapter", str(adapter), "--benchmark", "muse", "--data",
                 str(shared_data / "muse-news"), "--limit", "1", "--max-len", "64", "--precision", "fp32,bf16",
                 "--retrain-auc", "0.5", "--out", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["precision"] for r in recs] == ["fp32", "bf16"] and all(r["adapter"] == str(adapter) for r in recs)


def test_min_k_gap_scaled_against_reference_scores(model_tok, shared_data, muse_result):
    model, tok = model_tok
    r = muse_result
    own = {side: [d["Min-40%"] for d in r["items"]["privleak"][side]] for side in ("forget", "holdout")}
    m = float(np.mean(own["forget"] + own["holdout"]))
    flat = {side: [m] * len(v) for side, v in own.items()}  # no forget/holdout gap at all
    kw = dict(limit=LIMIT, score_batch_size=4, max_len=MAX_LEN, metrics=["privleak"])
    # as its own target, against a reference without a gap: exactly 1; as its own retrain model: 0
    a = muse.evaluate_muse(model, tok, shared_data / "muse-news", gap_refs={"target": own, "retrain": flat}, **kw)
    g = own["holdout"], own["forget"]
    assert a["min_k_gap_scaled"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert a["min_k_gap_scaled"]["gap"] == pytest.approx(np.mean(g[0]) - np.mean(g[1]), abs=1e-9)
    b = muse.evaluate_muse(model, tok, shared_data / "muse-news", gap_refs={"target": flat, "retrain": own}, **kw)
    assert b["min_k_gap_scaled"]["value"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="gap_refs"):
        muse.evaluate_muse(model, tok, shared_data / "muse-news", gap_refs={"target": own}, **kw)
    with pytest.raises(ValueError, match=r"gap_refs\['retrain'\]\['forget'\] has 1 scores"):
        muse.evaluate_muse(model, tok, shared_data / "muse-news",
                           gap_refs={"target": own, "retrain": {"forget": [0.0], "holdout": own["holdout"]}}, **kw)

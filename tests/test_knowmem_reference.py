"""KnowMem recomputed independently, the way MUSE's ``metrics/knowmem.py`` does it: transformers
``generate`` (greedy, one prompt at a time, MUSE's 32 new tokens), the answer cut at MUSE's stop
words, ROUGE-L F1 from rouge-score without stemmer, mean x100 (``mean_rougeL``). qru's
``evaluate_muse`` (batched, shared ICL prefix, its own model and generation) must agree within one item."""
import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
from rouge_score import rouge_scorer

from qru.eval import muse

N_ITEMS, N_SHOTS = 6, 3


def _muse_cut(text: str) -> str:  # get_prefix_before_words_occur(output, ["\n\n", "\nQuestion", "Question:"])
    for w in ["\n\n", "\nQuestion", "Question:"]:
        text = text.split(w)[0]
    return text


@pytest.fixture(scope="module")
def knowmem_files(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("knowmem_ref")
    src = shared_data / "muse-news" / "knowmem"
    qa = json.load(open(src / "forget_qa.json"))[:N_ITEMS]
    icl = json.load(open(src / "forget_qa_icl.json"))[:N_SHOTS]  # short prompts: they fit the tiny context
    (root / "qa.json").write_text(json.dumps(qa))
    (root / "icl.json").write_text(json.dumps(icl))
    return root, qa, icl


def test_knowmem_is_muse_rougeL_f1_via_transformers(tiny_dir, model_tok, knowmem_files, shared_data):
    from transformers import LlamaForCausalLM

    root, qa, icl = knowmem_files
    model, tok = model_tok
    got = muse.evaluate_muse(model, tok, shared_data / "muse-news", metrics=["knowmem_f"], batch_size=4,
                             files={"knowmem_forget_qa": str(root / "qa.json"),
                                    "knowmem_forget_qa_icl": str(root / "icl.json")})
    # the reference: its own model, tokenizer (sentencepiece directly), generation, cut and scorer
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    general = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in icl)
    f1, rec, outs = [], [], []
    for d in qa:
        ids = torch.tensor([[sp.bos_id()] + sp.encode(general + f"Question: {d['question']}\nAnswer: ")])
        assert ids.shape[1] + 32 <= hf.config.max_position_embeddings
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                              pad_token_id=sp.pad_id(), eos_token_id=sp.eos_id())
        new = [int(t) for t in out[0, ids.shape[1]:] if int(t) not in (sp.bos_id(), sp.eos_id(), sp.pad_id())]
        ans = _muse_cut(sp.decode(new))
        s = scorer.score(d["answer"], ans)["rougeL"]
        f1.append(s.fmeasure)
        rec.append(s.recall)
        outs.append(ans)
    items = got["items"]["knowmem_f"]
    differ = [i for i, it in enumerate(items) if abs(it["rougeL_f"] - f1[i]) > 1e-9]
    assert len(differ) <= 1, (differ, [it["output"] for it in items], outs)
    assert sum(a == b for a, b in zip((it["output"] for it in items), outs)) >= N_ITEMS - 1
    assert got["knowmem_f"] == pytest.approx(100 * np.mean(f1), abs=100 / N_ITEMS)
    assert got["knowmem_f_recall"] == pytest.approx(100 * np.mean(rec), abs=100 / N_ITEMS)
    assert any(o.strip() for o in outs)  # the comparison is not between empty answers


def test_generation_defaults_are_muse():
    from qru.demo.presets import MUSE_KNOWMEM_TOKENS, MUSE_VERBMEM_TOKENS, EvalSpec

    # MUSE eval.py: verbmem_max_new_tokens=128, knowmem_max_new_tokens=32
    assert (muse.VERBMEM_MAX_NEW, muse.KNOWMEM_MAX_NEW) == (128, 32)
    assert (MUSE_VERBMEM_TOKENS, MUSE_KNOWMEM_TOKENS) == (128, 32)
    assert (EvalSpec().verbmem_tokens, EvalSpec().knowmem_tokens) == (128, 32)
    import inspect

    sig = inspect.signature(muse.evaluate_muse).parameters
    assert sig["verbmem_max_new_tokens"].default == 128 and sig["knowmem_max_new_tokens"].default == 32

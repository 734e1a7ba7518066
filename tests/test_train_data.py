"""qru.train.data: formats, answer-only masks, chunking, token cache, deterministic batching, errors."""
import json

import pytest
import torch

from qru.eval import tofu as tofu_eval
from qru.model.tokenizer import Tokenizer
from qru.train import data as D


@pytest.fixture(scope="module")
def tofu(shared_data):
    return shared_data / "tofu"


@pytest.fixture(scope="module")
def tok(tofu, tmp_path_factory):
    recs = [json.loads(line) for line in open(tofu / "full.json", encoding="utf-8")][:800]
    texts = [D.format_qa(r["question"], r["answer"]) for r in recs]
    return Tokenizer.train(texts, 1024, tmp_path_factory.mktemp("tok") / "tokenizer.model", seed=0)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_qa_mask_is_answer_only(tok, tofu, cache):
    ts = D.load_sets(tofu / "forget01.json", tok, 256, cache_dir=cache, role="forget")
    recs = [json.loads(line) for line in open(tofu / "forget01.json", encoding="utf-8")]
    assert len(ts) == len(recs) == 40
    for i in (0, 7, 39):
        ids, m = ts.example(i)
        m = m.bool()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and m[-1] and not m[0]
        # targets are exactly the answer (then eos); the rest is the prompt
        assert tok.decode(ids[m]).strip() == recs[i]["answer"]
        assert tok.decode(ids[~m]) == D.qa_prompt(recs[i]["question"])
        # the sequence is the tokenized template
        assert ids.tolist() == tok.encode(D.format_qa(recs[i]["question"], recs[i]["answer"]), eos=True)
        # ... which is the evaluation prompt followed by the answer
        assert ids.tolist() == tok.encode(tofu_eval.TEMPLATE.format(question=recs[i]["question"]) + recs[i]["answer"],
                                          eos=True)
    full = D.load_sets(tofu / "forget01.json", tok, 256, qa_loss="all", cache_dir=cache)
    assert torch.equal(full.ids, ts.ids) and full.num_targets == full.num_tokens - len(full)


def test_qa_truncation_drops_answerless_rows(tok, tofu, cache):
    with pytest.warns(UserWarning, match="dropped"):
        ts = D.load_sets(tofu / "forget01.json", tok, 40, cache_dir=cache)
    assert 0 < len(ts) < 40 and int(ts.lengths().max()) <= 40
    for i in range(len(ts)):
        assert ts.example(i)[1].sum() > 0


def test_text_chunking(tok, tmp_path, cache):
    doc = " ".join(f"Sentence number {i} talks about Basil Mahfouz Al-Kuwaiti." for i in range(40))
    f = tmp_path / "doc.txt"
    f.write_text(doc)
    ts = D.load_sets(f, tok, 32, cache_dir=cache)
    assert len(ts) > 3 and int(ts.lengths().max()) == 32
    joined = []
    for i in range(len(ts)):
        ids, m = ts.example(i)
        assert ids[0] == tok.bos_id and m[0] == 0 and bool(m[1:].all())
        joined += ids[1:].tolist()
    assert joined == tok.encode(doc, bos=False, eos=True)


def test_muse_layout_and_json_text(tok, tmp_path, cache):
    raw = tmp_path / "muse" / "raw"
    raw.mkdir(parents=True)
    (raw / "a.txt").write_text("First news document about the Orkney Islands.")
    (raw / "b.txt").write_text("Second news document, about snooker at the Crucible.")
    ts = D.load_sets(tmp_path / "muse", tok, 64, cache_dir=cache)
    assert len(ts) == 2
    assert tok.decode(ts.example(1)[0]) == "Second news document, about snooker at the Crucible."
    arr = tmp_path / "docs.json"
    arr.write_text(json.dumps(["First news document about the Orkney Islands.", "Another one."]))
    ja = D.load_sets(arr, tok, 64, cache_dir=cache)
    assert len(ja) == 2 and torch.equal(ja.example(0)[0], ts.example(0)[0])
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x y z", "Another one."])))
    assert torch.equal(D.load_sets(jl, tok, 64, cache_dir=cache).example(1)[0], ja.example(1)[0])


def test_muse_knowmem_json_array_is_qa(tok, shared_data, cache):
    ts = D.load_sets(shared_data / "muse-news" / "knowmem" / "forget_qa.json", tok, 128, cache_dir=cache)
    assert len(ts) == 100 and ts.num_targets < ts.num_tokens - len(ts)


def test_token_cache_hit_and_keys(tok, tofu, tmp_path, cache, monkeypatch):
    f = tmp_path / "qa.jsonl"
    f.write_text((tofu / "forget01.json").read_text())
    a = D.load_tokens(f, tok, 128, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1

    def boom(path):
        raise AssertionError("cache miss")

    monkeypatch.setattr(D, "read_records", boom)
    b = D.load_tokens(f, tok, 128, cache_dir=cache)  # hit: no re-read
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask) and torch.equal(a.offsets, b.offsets)
    monkeypatch.undo()
    D.load_tokens(f, tok, 96, cache_dir=cache)  # max_len is part of the key
    D.load_tokens(f, tok, 128, qa_loss="all", cache_dir=cache)  # so is the loss mask mode
    f.write_text(f.read_text().replace("Basil", "Basilio"))  # so is the content
    c = D.load_tokens(f, tok, 128, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 4 and not torch.equal(a.ids, c.ids)
    monkeypatch.setenv("QRU_CACHE", str(tmp_path / "envcache"))
    assert D.default_cache_dir() == tmp_path / "envcache" / "tokens"


def test_batch_stream_deterministic_and_resumable():
    s1, s2 = D.BatchStream(10, 3, seed=5), D.BatchStream(10, 3, seed=5)
    a = [s1.next().tolist() for _ in range(8)]
    assert a == [s2.next().tolist() for _ in range(8)]
    assert s1.batches_per_epoch == 4
    epoch0 = sorted(i for b in a[:4] for i in b)
    assert epoch0 == list(range(10)) and [len(b) for b in a[:4]] == [3, 3, 3, 1]
    assert a[:4] != a[4:8]  # reshuffled each epoch
    assert a != [b.tolist() for b in (D.BatchStream(10, 3, seed=6).next() for _ in range(8))]
    # resume from a saved state mid-epoch
    s3 = D.BatchStream(10, 3, seed=5)
    for _ in range(5):
        s3.next()
    st = s3.state_dict()
    assert st == {"epoch": 1, "pos": 1}
    s4 = D.BatchStream(10, 3, seed=5)
    s4.load_state_dict(st)
    assert [s4.next().tolist() for _ in range(3)] == a[5:8]


def test_collate_and_fixed_sample(tok, tofu, cache):
    ts = D.load_sets(tofu / "forget01.json", tok, 256, cache_dir=cache)
    b = D.collate(ts, [3, 0], tok.pad_id)
    n3, n0 = len(ts.example(3)[0]), len(ts.example(0)[0])
    assert b.input_ids.shape == (2, max(n3, n0))
    assert b.attention_mask.sum(1).tolist() == [n3, n0]
    assert int((b.input_ids[b.attention_mask == 0] != tok.pad_id).sum()) == 0
    assert int(b.loss_mask[b.attention_mask == 0].sum()) == 0
    assert b.index.tolist() == [3, 0]
    assert D.fixed_sample(40, 8, 0) == D.fixed_sample(40, 8, 0) and len(set(D.fixed_sample(40, 8, 0))) == 8
    assert D.fixed_sample(5, 8, 0) == [0, 1, 2, 3, 4]
    sub = ts.subset([2, 5])
    assert torch.equal(sub.example(1)[0], ts.example(5)[0])


def test_errors(tok, tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="forget set.*nope.json"):
        D.load_sets(tmp_path / "nope.json", tok, 64, cache_dir=cache, role="forget")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(D.DataError, match="forget set.*empty"):
        D.load_sets(empty, tok, 64, cache_dir=cache, role="forget")
    (tmp_path / "arr.json").write_text("[]")
    with pytest.raises(D.DataError, match="empty"):
        D.load_sets(tmp_path / "arr.json", tok, 64, cache_dir=cache)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "gt": "b"}\n')
    with pytest.raises(D.DataError, match="'question' and 'answer'"):
        D.load_sets(bad, tok, 64, cache_dir=cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a", "answer": \n')
    with pytest.raises(D.DataError, match="broken.jsonl"):
        D.load_sets(broken, tok, 64, cache_dir=cache)
    with pytest.raises(D.DataError, match="unknown data file type"):
        (tmp_path / "x.csv").write_text("a,b")
        D.load_sets(tmp_path / "x.csv", tok, 64, cache_dir=cache)
    with pytest.raises(D.DataError, match="no \\*.txt"):
        (tmp_path / "d").mkdir()
        D.load_sets(tmp_path / "d", tok, 64, cache_dir=cache)
    with pytest.raises(D.DataError, match="max_len"):
        D.load_sets(empty, tok, 1, cache_dir=cache)
    with pytest.raises(D.DataError, match="no retain data"):
        D.load_sets([], tok, 64, role="retain")

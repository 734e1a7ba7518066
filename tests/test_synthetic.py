"""Synthetic MUSE-layout corpus: determinism, disjoint groups, learnable facts, MUSE formats, CLI."""
import json
import re
from pathlib import Path

import pytest

from qru.data.synthetic import make_corpus, write_corpus
from qru.data.synthetic_vocab import FACT_TYPES, PROSE, VOCAB

SMALL = dict(people=4, retain=6, holdout=4, general=10, generic_docs=5)
JSON_FILES = ["knowmem/forget_qa.json", "knowmem/retain_qa.json", "knowmem/forget_qa_icl.json",
              "knowmem/retain_qa_icl.json", "verbmem/forget.json", "privleak/forget.json",
              "privleak/retain.json", "privleak/holdout.json"]
LAYOUT = sorted(["raw/forget.txt", "raw/retain.txt", "raw/holdout.txt", "raw/general.txt", "meta.json",
                 *JSON_FILES])


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(**SMALL, seed=3)


def _docs(text: str) -> list[str]:
    assert text.endswith("\n") and not text.endswith("\n\n")
    return text[:-1].split("\n\n")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mentions(name: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def test_write_is_deterministic_and_seed_dependent(tmp_path):
    a = write_corpus(tmp_path / "a", **SMALL, seed=7)
    write_corpus(tmp_path / "b", **SMALL, seed=7)
    write_corpus(tmp_path / "c", **SMALL, seed=8)
    ta, tb, tc = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert sorted(ta) == LAYOUT == sorted(a.paths)
    assert ta == tb
    assert all(ta[f] != tc[f] for f in LAYOUT if f != "meta.json" and not f.endswith("_icl.json")) \
        and ta["meta.json"] != tc["meta.json"]
    names = lambda seed: {p.name for ps in make_corpus(**SMALL, seed=seed).people.values() for p in ps}
    assert names(7) != names(8)
    # in-memory files are exactly what was written; no temporary files left behind
    assert ta == {k: v.encode("utf-8") for k, v in make_corpus(**SMALL, seed=7).files().items()}
    assert [p.name for p in tmp_path.iterdir()] and all(not p.name.startswith(".") for p in tmp_path.iterdir())


def test_rewrite_existing_dir_needs_overwrite_and_replaces_it_whole(tmp_path):
    out = tmp_path / "corpus"
    write_corpus(out, **SMALL, seed=1)
    (out / "notes.txt").write_text("old")
    before = _tree(out)
    with pytest.raises(ValueError, match=r"corpus exists and is not empty; pass --overwrite"):
        write_corpus(out, **SMALL, seed=2)
    assert _tree(out) == before
    info = write_corpus(out, **SMALL, seed=2, overwrite=True)
    tree = _tree(out)  # one commit: the new corpus exactly, nothing of the old directory
    assert tree == {k: v.encode("utf-8") for k, v in make_corpus(**SMALL, seed=2).files().items()}
    assert info.root == out and info.counts["people_forget"] == SMALL["people"]
    assert not [p for p in out.rglob(".*")]


def test_default_sizes():
    c = make_corpus()
    assert {g: len(p) for g, p in c.people.items()} == {"forget": 20, "retain": 40, "holdout": 20, "general": 60}
    assert len(c.knowmem["forget_qa"]) == 20 * 6 and len(c.knowmem["retain_qa"]) == 40 * 6
    assert len(c.knowmem["forget_qa_icl"]) == len(c.knowmem["retain_qa_icl"]) == 3
    assert len(c.verbmem) == 20
    assert [len(c.privleak[g]) for g in ("forget", "retain", "holdout")] == [64, 160, 64]
    assert all(len(p.facts) == 6 and len(p.docs) == 4 for ps in c.people.values() for p in ps)


def test_groups_are_disjoint_and_confined_to_their_file(corpus):
    groups = {g: [p.name for p in ps] for g, ps in corpus.people.items()}
    all_names = [n for ns in groups.values() for n in ns]
    assert len(all_names) == len(set(all_names))
    for g, names in groups.items():
        for name in names:
            assert _mentions(name, corpus.raw[g]), (g, name)
            for other, text in corpus.raw.items():
                if other != g:
                    assert not _mentions(name, text), (name, g, other)
    # forget/retain QA only about their own group; ICL shots only about general people
    for side in ("forget", "retain"):
        for qa in corpus.knowmem[f"{side}_qa"]:
            assert [n for n in all_names if _mentions(n, qa["question"])] in ([n] for n in groups[side])
        for qa in corpus.knowmem[f"{side}_qa_icl"]:
            assert any(_mentions(n, qa["question"]) for n in groups["general"])
    icl_f = {q["question"] for q in corpus.knowmem["forget_qa_icl"]}
    assert icl_f.isdisjoint(q["question"] for q in corpus.knowmem["retain_qa_icl"])


def test_vocabularies_are_disjoint_and_short():
    seen = {}
    for t, values in VOCAB.items():
        assert len(values) == len(set(values)) >= 20, t
        for v in values:
            assert 1 <= len(v.split()) <= 3 and v not in seen, (t, v, seen.get(v))
            seen[v] = t
    assert set(PROSE) == set(FACT_TYPES)


@pytest.mark.parametrize("qa_docs", [True, False])
def test_every_answer_is_stated_in_a_prose_sentence_naming_the_person(qa_docs):
    c = make_corpus(**SMALL, seed=5, qa_docs=qa_docs)
    for side in ("forget", "retain"):
        file_docs = set(_docs(c.raw[side]))
        by_name = {p.name: p for p in c.people[side]}
        for qa in c.knowmem[f"{side}_qa"]:
            (name,) = [n for n in by_name if _mentions(n, qa["question"])]
            person = by_name[name]
            assert qa["answer"] in person.facts.values()
            assert set(person.docs) <= file_docs
            # every prose document states every fact; the first names the person in each sentence
            assert all(qa["answer"] in d for d in person.docs)
            sentences = person.docs[0].split(". ")
            assert any(qa["answer"] in s and name in s for s in sentences), (name, qa)
            qa_doc = f"Question: {qa['question']}\nAnswer: {qa['answer']}"
            assert (qa_doc in file_docs) is qa_docs
    # general people always carry QA documents (the base learns the format); ICL answers are stated there
    gen_docs = set(_docs(c.raw["general"]))
    for qa in c.knowmem["forget_qa_icl"] + c.knowmem["retain_qa_icl"]:
        assert f"Question: {qa['question']}\nAnswer: {qa['answer']}" in gen_docs


def test_verbmem_prompt_and_gt_split_a_forget_document(corpus):
    forget_docs = _docs(corpus.raw["forget"])
    assert len(corpus.verbmem) == len(corpus.people["forget"])
    for item, person in zip(corpus.verbmem, corpus.people["forget"]):
        doc = item["prompt"] + item["gt"]
        assert doc == person.docs[0] and doc in forget_docs
        assert item["prompt"].endswith(".") and item["prompt"].count(". ") == 1  # two sentences
        assert item["gt"].startswith(" ") and len(item["gt"]) > len(item["prompt"])


def test_privleak_retain_texts_are_prose_documents(corpus):
    texts = corpus.privleak["retain"]
    assert texts == [d for p in corpus.people["retain"] for d in p.docs]
    assert set(texts) <= set(_docs(corpus.raw["retain"]))


def _sents(doc: str) -> list[str]:
    parts = doc.split(". ")
    return [x + "." for x in parts[:-1]] + [parts[-1]]


def test_privleak_forget_and_holdout_sets():
    from qru.data.synthetic import FILLER_POOL, _fillers

    c = make_corpus(people=8, retain=8, holdout=8, general=24, docs_per_person=2, seed=2)
    pool = set(_fillers(2, FILLER_POOL))
    raw = {g: _docs(c.raw[g]) for g in c.raw}
    fill_used = {}
    for g in ("forget", "holdout"):
        texts = c.privleak[g]
        assert len(texts) >= 64 and len(set(texts)) == len(texts)
        assert not any("Question:" in t for t in texts)
        # each document: one person's facts (1 or more), named in it, plus 1-5 shared filler sentences
        fill_used[g] = set()
        for i, t in enumerate(texts):
            p = c.people[g][i % len(c.people[g])]
            sents = _sents(t)
            fill = [x for x in sents if x in pool]
            facts = [x for x in sents if x not in pool]
            assert 1 <= len(fill) <= 5 and 1 <= len(facts) <= len(p.facts), t
            assert _mentions(p.name, t)
            assert all(any(v in x for v in p.facts.values()) for x in facts), t
            fill_used[g] |= set(fill)
            # every PrivLeak document is in its group's raw file exactly once, and in no other file
            assert raw[g].count(t) == 1
            assert all(t not in raw[o] for o in raw if o != g)
        lengths = [len(_sents(t)) for t in texts]
        assert len(set(lengths)) >= 5 and max(lengths) >= 2 * min(lengths)  # varied lengths
    assert len(fill_used["forget"] & fill_used["holdout"]) >= 0.8 * len(pool)  # fillers shared by both groups
    # a forget document is seen once; each fact it carries is seen in more documents (paraphrases)
    forget_docs = raw["forget"]
    for i, t in enumerate(c.privleak["forget"]):
        p = c.people["forget"][i % len(c.people["forget"])]
        for v in p.facts.values():
            if v in t:
                carriers = [d for d in forget_docs if v in d and _mentions(p.name, d)]
                assert len(carriers) > forget_docs.count(t), (p.name, v)
                assert len([d for d in carriers if d not in c.privleak["forget"]]) >= 2  # prose + QA


def test_formats_match_muse(shared_data, tmp_path):
    muse = shared_data / "muse-news"
    info = write_corpus(tmp_path / "synth", **SMALL, seed=0)
    for rel in JSON_FILES:
        theirs_text = (muse / rel).read_text(encoding="utf-8")
        ours_text = info.paths[rel].read_text(encoding="utf-8")
        theirs, ours = json.loads(theirs_text), json.loads(ours_text)
        # same serialisation: plain json.dumps, one line, no trailing newline
        assert json.dumps(theirs) == theirs_text and json.dumps(ours) == ours_text, rel
        assert isinstance(theirs, list) and isinstance(ours, list) and ours, rel
        kinds = lambda items: {(type(x).__name__, tuple(x) if isinstance(x, dict) else None) for x in items}
        assert kinds(ours) == kinds(theirs), rel  # same element type and key order
        for x in ours:
            vals = x.values() if isinstance(x, dict) else [x]
            assert all(isinstance(v, str) and v.strip() for v in vals), rel


def test_answers_are_short_spans(corpus):
    for qa in corpus.knowmem["forget_qa"] + corpus.knowmem["retain_qa"]:
        assert 1 <= len(qa["answer"].split()) <= 3 and qa["question"].endswith("?")


@pytest.mark.parametrize("kwargs, exc, culprit", [
    (dict(people=0), ValueError, "people"),
    (dict(people=-3), ValueError, "people"),
    (dict(people=2.5), TypeError, "people"),
    (dict(people=True), TypeError, "people"),
    (dict(retain=0), ValueError, "retain"),
    (dict(holdout=0), ValueError, "holdout"),
    (dict(facts_per_person=0), ValueError, "facts_per_person"),
    (dict(facts_per_person=len(FACT_TYPES) + 1), ValueError, "facts_per_person"),
    (dict(docs_per_person=0), ValueError, "docs_per_person"),
    (dict(icl=4, general=7), ValueError, "general"),
    (dict(icl=0), ValueError, "icl"),
    (dict(prompt_sentences=7), ValueError, "prompt_sentences"),
    (dict(seed="0"), TypeError, "seed"),
    (dict(qa_docs=1), TypeError, "qa_docs"),
    (dict(people=200000), ValueError, "people"),
])
def test_bad_arguments(kwargs, exc, culprit):
    with pytest.raises(exc, match=culprit):
        make_corpus(**kwargs)


def test_out_dir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="out_dir"):
        write_corpus(f, people=1)


def test_cli_writes_layout(tmp_path, capsys):
    from qru.cli import main

    out = tmp_path / "demo"
    assert main(["data", "synth", "--out", str(out), "--people", "3", "--seed", "4", "--general", "8"]) == 0
    assert "people forget/retain/holdout/general = 3/6/3/8" in capsys.readouterr().out
    assert _tree(out) == {k: v.encode("utf-8")
                          for k, v in make_corpus(people=3, seed=4, general=8).files().items()}
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--people", "0"]) == 2
    assert "people" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_identical_across_processes_with_different_hash_seeds(tmp_path):
    import os
    import subprocess
    import sys

    code = "import sys; from qru.data.synthetic import write_corpus; write_corpus(sys.argv[1], people=3, seed=9)"
    for i, hs in enumerate(("1", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hs}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(i))], check=True, env=env)
    assert _tree(tmp_path / "0") == _tree(tmp_path / "1")

"""qru.data: the one QA template (training text == evaluation prompt + answer) and the one record reader."""
import json

import pytest

from qru.data import QA_PROMPT, DataError, format_qa, qa_prompt, read_records, read_texts
from qru.eval import muse, tofu
from qru.train import data as train_data


def test_template_by_hand():
    assert format_qa("Who?", "Me.") == "Question: Who?\nAnswer: Me."
    assert QA_PROMPT.format(question="Who?") == "Question: Who?\nAnswer: "
    assert qa_prompt("Who?") == "Question: Who?\nAnswer:"


def test_training_text_is_evaluation_prompt_plus_answer(shared_data):
    recs = read_records(shared_data / "tofu" / "forget01.json", ("question", "answer"))
    icl = [(r["question"], r["answer"]) for r in recs[:2]]
    for r in recs:
        q, a = r["question"], r["answer"]
        train_text = train_data.format_qa(q, a)  # what training tokenizes
        assert train_text == tofu.TEMPLATE.format(question=q) + a  # TOFU's eval prompt, then the answer
        assert train_text == muse.knowmem_prompt(q, []) + a  # MUSE KnowMem's, without shots
        assert muse.knowmem_prompt(q, icl) == "".join(f"Question: {x}\nAnswer: {y}\n\n" for x, y in icl) + \
            QA_PROMPT.format(question=q)
        # the training prompt (the masked-out part) is the eval prompt without its trailing space
        assert train_data.qa_prompt(q) + " " == tofu.TEMPLATE.format(question=q)


def test_read_records_sources(tmp_path):
    (tmp_path / "a.txt").write_text("doc one\n")
    assert read_records(tmp_path / "a.txt") == [{"text": "doc one\n"}]
    (tmp_path / "d" / "raw").mkdir(parents=True)
    (tmp_path / "d" / "raw" / "x.txt").write_text("x")
    (tmp_path / "d" / "raw" / "y.txt").write_text("  \n")  # whitespace-only: dropped
    assert read_records(tmp_path / "d") == [{"text": "x"}]
    (tmp_path / "l.jsonl").write_text('{"question": "q", "answer": "a"}\n\n"s"\n')
    assert read_records(tmp_path / "l.jsonl", allow_str=True) == [{"question": "q", "answer": "a"}, "s"]
    (tmp_path / "j.json").write_text(json.dumps([{"prompt": "p", "gt": "g"}, {"text": "t"}]))
    assert read_texts(tmp_path / "j.json") == ["pg", "t"]
    assert read_texts(tmp_path / "l.jsonl") == ["Question: q\nAnswer: a", "s"]


@pytest.mark.parametrize("name, content, match", [
    ("x.csv", "a,b", "x.csv: unknown data file type '.csv'"),
    ("e.json", "", "e.json: empty file"),
    ("e2.json", "[]", "e2.json: empty list"),
    ("b.jsonl", '{"a": "1"}\n{broken\n', "b.jsonl: line 2 is not valid JSON"),
    ("u.txt", b"\xff\xfe", "u.txt: not UTF-8"),
    ("o.json", "[1]", "o.json: item 0 is a int"),
    ("s.json", '["t"]', "s.json: item 0 is a str"),
])
def test_read_records_errors_are_one_class(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        read_records(p)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records(tmp_path / "nope.json")
    (tmp_path / "f.json").write_text(json.dumps([{"question": "q", "answer": 3}]))
    with pytest.raises(DataError, match="f.json: item 0 field 'answer' must be a string"):
        read_records(tmp_path / "f.json", ("question", "answer"))
    with pytest.raises(DataError, match="record 0 has no text"):
        (tmp_path / "n.json").write_text('[{"foo": "x"}]')
        read_texts(tmp_path / "n.json")

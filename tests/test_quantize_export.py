"""``qru quantize`` / quantize_checkpoint: bit-exact against quantize(merge(W, adapter)),
bitsandbytes and transformers read the nf4/fp4 export, Llama.from_pretrained runs it as
deployed, streaming, atomic output and clear errors."""
import json
import os

import pytest
import torch
from torch import nn

import qru.quant as Q
import qru.quant.export as E
from qru.cli import main
from qru.model.checkpoint import CheckpointError, load_state_dict
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.model.lora import (AdapterError, adapter_scales, apply_lora, map_adapter_keys, merge_weight, read_adapter,
                           save_adapter)
from qru.quant.qlinear import QuantLinear

VOCAB = 128
BASE_SHARD = "40KB"  # several input shards


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    # intermediate 192: every in_features is a multiple of 64 (bitsandbytes' CPU dequantize is
    # only right there, see docs/formats.md); attention_bias exercises quantized-linear biases
    cfg = LlamaConfig.preset("tiny", vocab_size=VOCAB, intermediate_size=192, attention_bias=True, **kw)
    return Llama(cfg).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qexport")
    model = _tiny()
    model.save_pretrained(root / "base", max_shard_size=BASE_SHARD)
    (root / "base" / "tokenizer.model").write_bytes(b"not really a tokenizer")
    lm = _tiny()
    apply_lora(lm, r=4, alpha=8, seed=1)
    g = torch.Generator().manual_seed(2)
    for m in lm.modules():
        if hasattr(m, "lora_B"):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.05
    save_adapter(lm, root / "adapter")
    other = Llama(LlamaConfig.preset("tiny", vocab_size=VOCAB, hidden_size=96, num_attention_heads=4,
                                     num_key_value_heads=2))
    apply_lora(other, r=4, alpha=8, seed=1)
    save_adapter(other, root / "other_adapter")
    assert len(list((root / "base").glob("model-*.safetensors"))) > 2
    return root


def _reference_weights(root, adapter):
    """fp32 weights after the fp32 merge: what quantize_checkpoint must quantize."""
    sd = {k: v.clone() for k, v in load_state_dict(root / "base").items()}
    if adapter:
        cfg, asd = read_adapter(root / "adapter")
        scales = adapter_scales(asd, cfg)
        for wkey, (a, b) in map_adapter_keys(asd.keys()).items():
            sd[wkey] = merge_weight(sd[wkey].float(), asd[a], asd[b], scales[wkey])
    return sd


def _targets(sd):
    return [k[: -len(".weight")] for k in sd if k.endswith("_proj.weight")]


@pytest.mark.parametrize("fmt,dq,adapter", [("nf4", False, False), ("nf4", True, True), ("fp4", True, False),
                                            ("fp4", False, True), ("int4", False, True), ("int4_sym", False, False),
                                            ("int8", False, True)])
def test_export_bit_exact(base, tmp_path, fmt, dq, adapter):
    out = tmp_path / "q"
    E.quantize_checkpoint(base / "base", out, fmt, adapter=base / "adapter" if adapter else None, double_quant=dq,
                          compute_dtype="bf16", max_shard_size="30KB", progress=fmt == "nf4")
    ref = _reference_weights(base, adapter)
    got = load_state_dict(out)
    bs = None if fmt == "int8" else Q.formats.DEFAULT_BLOCK_SIZE[fmt]
    expect_keys = set()
    for mod in _targets(ref):
        q = Q.quantize(ref[f"{mod}.weight"], fmt, bs, double_quant=dq)
        assert ref[f"{mod}.weight"].dtype == torch.float32
        packed = E.pack_tensors(mod, q, torch.bfloat16)
        for k, t in packed.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
        expect_keys |= packed.keys()
        # codes and absmax / scales in qru's own terms too
        q2, _ = E.unpack_tensors(mod, got, fmt, tuple(ref[f"{mod}.weight"].shape), bs)
        assert torch.equal(q2.data, q.data) and torch.equal(q2.scales, q.scales)
        if dq:
            assert torch.equal(q2.absmax(), q.absmax())
    for k, t in ref.items():
        if not k.endswith("_proj.weight"):
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], t.to(torch.bfloat16)), k
            expect_keys.add(k)
    assert set(got) == expect_keys
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert (out / "tokenizer.model").read_bytes() == b"not really a tokenizer"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    qc = cfg["quantization_config"]
    if fmt in ("nf4", "fp4"):
        assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == fmt
        assert qc["bnb_4bit_use_double_quant"] is dq and qc["llm_int8_skip_modules"] == ["lm_head"]
        assert qc["bnb_4bit_compute_dtype"] == "bfloat16" and qc["bnb_4bit_quant_storage"] == "uint8"
    else:
        assert qc == {"quant_method": "qru", "format": fmt, "block_size": bs, "compute_dtype": "bfloat16",
                      "skip_modules": ["lm_head"], "layout_version": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_bnb_layout_matches_bitsandbytes_as_dict():
    """Our tensors for one weight == bitsandbytes' own QuantState.as_dict(packed=True)."""
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(0))
    for fmt in ("nf4", "fp4"):
        for dq in (False, True):
            bq, st = F.quantize_4bit(w, blocksize=64, quant_type=fmt, compress_statistics=dq)
            ours = E.pack_tensors("m", Q.quantize(w, fmt, 64, double_quant=dq), torch.float32)
            theirs = {"m.weight": bq, **{f"m.weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
            assert ours.keys() == theirs.keys()
            for k in ours:
                assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), (fmt, dq, k)


@pytest.mark.parametrize("fmt,dq", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_bitsandbytes_dequantizes_our_export(base, tmp_path, fmt, dq):
    F = pytest.importorskip("bitsandbytes.functional")
    out = tmp_path / "q"
    E.quantize_checkpoint(base / "base", out, fmt, adapter=base / "adapter", double_quant=dq, compute_dtype="fp32")
    got = load_state_dict(out)
    for mod in _targets(load_state_dict(base / "base")):
        w = f"{mod}.weight"
        qs = F.QuantState.from_dict({k[len(w) + 1:]: v for k, v in got.items() if k.startswith(w + ".")},
                                    device=torch.device("cpu"))
        theirs = F.dequantize_4bit(got[w], qs)
        q, _ = E.unpack_tensors(mod, got, fmt, tuple(qs.shape))
        assert theirs.dtype == torch.float32
        assert torch.equal(theirs, q.dequantize(torch.float32)), mod


def _exact_bnb(model):
    """bitsandbytes' reference CPU path for every Linear4bit: on CPUs with AVX512-BF16 it otherwise
    repacks the weight and runs its bf16 kernel (logits off by ~3e-3 even at fp32 compute), which
    is not the fp32 dequantize-then-matmul these comparisons are about."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out).float()


@pytest.mark.parametrize("fmt,dq,cd", [("nf4", False, "fp32"), ("fp4", True, "fp32"), ("nf4", True, "bf16")])
def test_transformers_loads_export_prequantized(base, tmp_path, fmt, dq, cd):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    E.quantize_checkpoint(base / "base", out, fmt, adapter=base / "adapter", double_quant=dq, compute_dtype=cd)
    hf = _exact_bnb(AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval())
    assert type(hf.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert type(hf.lm_head).__name__ == "Linear"
    ours = Llama.from_pretrained(out).eval()
    assert isinstance(ours.model.layers[0].mlp.down_proj, QuantLinear)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    a, b = _logits(hf, ids), _logits(ours, ids)
    a1, b1 = _logits(hf, ids[:1, :1]), _logits(ours, ids[:1, :1])  # decode: our fused kernel
    if cd == "fp32":
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b1, a1, rtol=1e-5, atol=1e-5)
    else:
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() <= 0.05 * scale
        assert (a1 - b1).abs().max().item() <= 0.05 * scale


def test_from_pretrained_equals_in_memory_quantize_model(base, tmp_path):
    """The export loaded as deployed == merge in fp32 then quantize_model, same compute dtype."""
    from qru.model.lora import load_adapter, merge_and_unload

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    for fmt in ("int4", "nf4"):
        out = tmp_path / fmt
        E.quantize_checkpoint(base / "base", out, fmt, adapter=base / "adapter", double_quant=fmt == "nf4",
                              compute_dtype="fp32")
        loaded = Llama.from_pretrained(out).eval()
        mem = merge_and_unload(load_adapter(Llama.from_pretrained(base / "base", dtype=torch.float32),
                                            base / "adapter"))
        mem = Q.quantize_model(mem, fmt, double_quant=fmt == "nf4").eval()
        assert torch.equal(_logits(loaded, ids), _logits(mem, ids))


def test_load_transformers_made_bnb_checkpoint(base, tmp_path):
    """A checkpoint quantized and saved by transformers + bitsandbytes loads in qru as deployed."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    hf = _exact_bnb(AutoModelForCausalLM.from_pretrained(base / "base", quantization_config=bnb_cfg,
                                                         dtype=torch.float32, device_map="cpu").eval())
    hf.save_pretrained(tmp_path / "hfq")
    ours = Llama.from_pretrained(tmp_path / "hfq").eval()
    assert isinstance(ours.model.layers[1].self_attn.q_proj, QuantLinear)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), rtol=1e-5, atol=1e-5)


def test_cli_quantize(base, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["quantize", str(base / "base"), "--adapter", str(base / "adapter"), "--format", "fp4",
               "--block-size", "128", "--double-quant", "--compute-dtype", "fp16", "--skip", "lm_head,down_proj",
               "--no-progress", "--out", str(out)])
    assert rc == 0 and "wrote fp4 checkpoint" in capsys.readouterr().out
    api = tmp_path / "api"
    E.quantize_checkpoint(base / "base", api, "fp4", 128, adapter=base / "adapter", double_quant=True,
                          compute_dtype=torch.float16, skip=("lm_head", "down_proj"))
    a, b = load_state_dict(out), load_state_dict(api)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16  # skipped: merged, compute dtype
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                                           "lm_head"]
    m = Llama.from_pretrained(out)
    assert isinstance(m.model.layers[0].mlp.down_proj, nn.Linear) and m.model.layers[0].mlp.up_proj.block_size == 128


def test_streams_one_tensor_at_a_time(base, tmp_path, monkeypatch):
    """The export reads through ShardReader (no whole-shard mmap) and flushes output shards as
    they fill: the writer never holds more than one shard's worth plus one tensor group."""
    import qru.model.checkpoint as C

    monkeypatch.setattr(C, "load_safetensors", lambda *a, **k: pytest.fail("whole-shard load"))
    held = []
    orig_add = E._ShardWriter.add

    def add(self, tensors):
        orig_add(self, tensors)
        held.append(self.used)
    monkeypatch.setattr(E._ShardWriter, "add", add)
    E.quantize_checkpoint(base / "base", tmp_path / "q", "int8", max_shard_size="20KB")
    monkeypatch.undo()
    biggest = max(t.numel() * t.element_size() for t in load_state_dict(tmp_path / "q").values())
    assert max(held) <= 20_000 + biggest
    assert len(list((tmp_path / "q").glob("model-*.safetensors"))) > 3


# ----------------------------------------------------------------------------- errors


def test_error_adapter_for_another_base(base, tmp_path):
    with pytest.raises(AdapterError, match=r"does not fit .*base tensor 'model\.layers\.\d\.\w+\.\w+_proj\.weight' has "
                                           r"shape \(\d+, \d+\)\): adapter key '.*lora_[AB]\.weight' has shape"):
        E.quantize_checkpoint(base / "base", tmp_path / "q", "nf4", adapter=base / "other_adapter")
    assert not (tmp_path / "q").exists()
    assert main(["quantize", str(base / "base"), "--adapter", str(base / "other_adapter"), "--format", "nf4",
                 "--out", str(tmp_path / "q")]) == 2


def test_error_bad_arguments(base, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown quantization format 'nf5'"):
        E.quantize_checkpoint(base / "base", tmp_path / "q", "nf5")
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(base / "base"), "--format", "nf5", "--out", str(tmp_path / "q")])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="block size 100 does not fit int4"):
        E.quantize_checkpoint(base / "base", tmp_path / "q", "int4", 100)
    with pytest.raises(ValueError, match="block size 64 does not apply to int8"):
        E.quantize_checkpoint(base / "base", tmp_path / "q", "int8", 64)
    with pytest.raises(ValueError, match="double quantization applies to nf4/fp4 only"):
        E.quantize_checkpoint(base / "base", tmp_path / "q", "int8", double_quant=True)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        E.quantize_checkpoint(tmp_path / "nope", tmp_path / "q", "nf4")
    assert main(["quantize", str(tmp_path / "nope"), "--format", "nf4", "--out", str(tmp_path / "q")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"is the input model .*base"):
        E.quantize_checkpoint(base / "base", base / "base", "nf4")
    assert not (tmp_path / "q").exists()


def test_error_int4_odd_in_features_names_module(tmp_path):
    Llama(LlamaConfig.preset("tiny", vocab_size=64, intermediate_size=175)).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: in_features=175 is odd"):
        E.quantize_checkpoint(tmp_path / "m", tmp_path / "q", "int4_sym")
    E.quantize_checkpoint(tmp_path / "m", tmp_path / "q", "nf4")  # nf4 flattens: fine


def test_error_nan_weight_names_tensor(tmp_path):
    m = _tiny()
    m.model.layers[1].mlp.gate_proj.weight.data[2, 3] = float("nan")
    m.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.gate_proj\.weight' has 1 non-finite"):
        E.quantize_checkpoint(tmp_path / "m", tmp_path / "q", "nf4")
    assert not (tmp_path / "q").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_run_leaves_no_partial_output(base, tmp_path, monkeypatch, exc):
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # mid-run: some shards already flushed
            raise exc
        return Q.quantize(*a, **k)
    monkeypatch.setattr(E, "quantize", failing)
    with pytest.raises(type(exc)):
        E.quantize_checkpoint(base / "base", tmp_path / "q", "nf4", max_shard_size="10KB")
    assert not (tmp_path / "q").exists()
    # an existing output directory is left exactly as it was
    prev = tmp_path / "prev"
    monkeypatch.undo()
    E.quantize_checkpoint(base / "base", prev, "int8")
    before = {p.name: p.read_bytes() for p in prev.iterdir()}
    calls.clear()
    monkeypatch.setattr(E, "quantize", failing)
    with pytest.raises(type(exc)):
        E.quantize_checkpoint(base / "base", prev, "nf4", max_shard_size="10KB", overwrite=True)
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]


def test_corrupt_quant_state_named(base, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "q"
    E.quantize_checkpoint(base / "base", out, "nf4", max_shard_size="1GB")
    shard = next(out.glob("model-*.safetensors"))
    sd = {k: v.clone() for k, v in load_state_dict(out).items()}
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(sd[key].tolist()))
    state["shape"] = [7, 7]
    sd[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    os.remove(shard)
    save_file(sd, str(shard))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight\.quant_state\."
                                              r"bitsandbytes__nf4' says shape \[7, 7\]"):
        Llama.from_pretrained(out)


@pytest.mark.parametrize("limit", [1, 100, 1 << 20])
def test_streaming_shard_writer_matches_safetensors(tmp_path, limit):
    """The tensor-by-tensor shard writer produces files the safetensors library reads back exactly."""
    import json as _json

    from safetensors.torch import load_file

    from qru.quant.export import _ShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(3, 5, generator=g).bfloat16(), "b.u8": torch.randint(0, 255, (7, 1),
               dtype=torch.uint8, generator=g), "c.f32": torch.randn(4, generator=g), "d.empty": torch.empty(0),
               "e.bool": torch.rand(6, generator=g) > 0.5, "f.i64": torch.arange(3), "g.f16": torch.randn(2, 2).half()}
    w = _ShardWriter(tmp_path, limit)
    for k, t in tensors.items():
        w.add({k: t})
    w.close()
    index = _json.loads((tmp_path / "model.safetensors.index.json").read_text())
    got = {}
    for f in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(tmp_path / f)))
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert not list(tmp_path.glob(".shard-*"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

"""Config and checkpoint I/O: round trips and clear errors for bad input."""
import json

import pytest
import torch

from qru.model.checkpoint import CheckpointError, load_safetensors, parse_size
from qru.model.config import ConfigError, LlamaConfig
from qru.model.llama import Llama


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    m = Llama(LlamaConfig.preset("tiny", vocab_size=64))
    m.save_pretrained(tmp_path)
    return tmp_path, m


def test_roundtrip_exact(saved):
    path, m = saved
    again = Llama.from_pretrained(path)
    for k, v in m.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_load_is_memory_mapped(saved):
    """Tensors share pages with the file: an in-place write to the file shows through
    (Linux MAP_PRIVATE pages that were never written reflect the file)."""
    path, _ = saved
    f = path / "model.safetensors"
    t = load_safetensors(f)["model.layers.1.self_attn.v_proj.weight"]
    data = f.read_bytes()
    at = data.index(t.clone().numpy().tobytes())
    with open(f, "r+b") as fh:
        fh.seek(at)
        fh.write(torch.full((t.numel(),), 2.0, dtype=t.dtype).numpy().tobytes())
    assert data.count(data[at:at + 64]) == 1
    assert torch.equal(t, torch.full_like(t, 2.0))


def test_bf16_load_casts(saved):
    path, m = saved
    b = Llama.from_pretrained(path, dtype=torch.bfloat16)
    assert b.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(b.lm_head.weight, m.lm_head.weight.to(torch.bfloat16))


def test_unknown_keys_reported_and_kept(tmp_path):
    d = LlamaConfig.preset("tiny").to_dict() | {"my_custom_key": 7}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="my_custom_key"):
        cfg = LlamaConfig.from_json(tmp_path)
    assert cfg.extra["my_custom_key"] == 7
    cfg.to_json(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["my_custom_key"] == 7


def test_hf_v5_layout_read(tmp_path):
    d = LlamaConfig.preset("tiny").to_dict()
    d.pop("rope_theta"), d.pop("torch_dtype")
    d["rope_parameters"] = {"rope_theta": 1234.0, "rope_type": "linear", "factor": 2.0}
    d["dtype"] = "bfloat16"
    cfg = LlamaConfig.from_dict(d)
    assert cfg.rope_theta == 1234.0 and cfg.rope_type == "linear" and cfg.torch_dtype == "bfloat16"


@pytest.mark.parametrize("change,match", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "yarn2", "factor": 2.0}}, "unknown rope type 'yarn2'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "low_freq_factor"),
    ({"torch_dtype": "float8"}, "torch_dtype"),
    ({"model_type": "gpt2"}, "model_type"),
])
def test_bad_config_names_field(change, match):
    d = LlamaConfig.preset("tiny").to_dict() | change
    with pytest.raises(ConfigError, match=match):
        LlamaConfig.from_dict(d)


def test_missing_config_key(tmp_path):
    d = LlamaConfig.preset("tiny").to_dict()
    del d["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        LlamaConfig.from_json(tmp_path)


def test_malformed_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        LlamaConfig.from_json(tmp_path)


def test_shape_mismatch_named(saved):
    path, _ = saved
    d = json.loads((path / "config.json").read_text())
    d["intermediate_size"] += 16
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        Llama.from_pretrained(path)


def test_truncated_file_named(saved):
    path, _ = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        Llama.from_pretrained(path)


def test_corrupt_header_named(saved):
    path, _ = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Llama.from_pretrained(path)


def _resave(path, sd):
    from safetensors.torch import save_file
    save_file(sd, str(path / "model.safetensors"))


def test_unexpected_and_missing_keys_named(saved):
    path, m = saved
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    _resave(path, sd)
    with pytest.raises(CheckpointError, match="unexpected.*extra.weight"):
        Llama.from_pretrained(path)
    del sd["model.layers.0.self_attn.extra.weight"]
    del sd["model.layers.1.mlp.up_proj.weight"]
    _resave(path, sd)
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.up_proj\.weight"):
        Llama.from_pretrained(path)


def test_nan_weight_named(saved):
    path, m = saved
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["model.layers.1.self_attn.k_proj.weight"][0, 3] = float("nan")
    _resave(path, sd)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*non-finite"):
        Llama.from_pretrained(path)


def test_missing_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Llama.from_pretrained(tmp_path / "nope")
    LlamaConfig.preset("tiny").to_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Llama.from_pretrained(tmp_path)


def test_missing_shard_named(tmp_path):
    m = Llama(LlamaConfig.preset("tiny", vocab_size=64))
    m.save_pretrained(tmp_path, max_shard_size="30KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        Llama.from_pretrained(tmp_path)


def test_resave_fewer_shards_removes_stale(tmp_path):
    m = Llama(LlamaConfig.preset("tiny", vocab_size=64))
    m.save_pretrained(tmp_path, max_shard_size="30KB")
    m.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("model-*.safetensors"))
    assert not (tmp_path / "model.safetensors.index.json").exists()
    Llama.from_pretrained(tmp_path)


def test_resave_keeps_files_it_does_not_own(tmp_path):
    """HF's pattern: tokenizer and weights saved into one directory in either order; a re-save
    replaces the weights (and drops stale shards) and keeps the tokenizer, in one commit."""
    m = Llama(LlamaConfig.preset("tiny", vocab_size=64))
    (tmp_path / "tokenizer.json").write_text('{"k": 1}')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("kept")
    m.save_pretrained(tmp_path, max_shard_size="30KB")
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "sub", "tokenizer.json"]
    assert (tmp_path / "tokenizer.json").read_text() == '{"k": 1}' and (tmp_path / "sub" / "notes.txt").read_text() == "kept"
    Llama.from_pretrained(tmp_path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import qru.model.checkpoint as ck
    m = Llama(LlamaConfig.preset("tiny", vocab_size=64))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        m.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("s,n", [("2GB", 2_000_000_000), ("500MB", 500_000_000), ("10KiB", 10240), (77, 77)])
def test_parse_size(s, n):
    assert parse_size(s) == n


def test_parse_size_bad():
    with pytest.raises(ValueError, match="2 parsecs"):
        parse_size("2 parsecs")


def test_shard_reader_equals_mmap_load(saved):
    from qru.model.checkpoint import ShardReader

    path, m = saved
    r = ShardReader(path / "model.safetensors")
    sd = m.state_dict()
    assert set(r.keys()) == set(sd) - {"lm_head.weight"} or set(r.keys()) == set(sd)
    for k in r.keys():
        assert torch.equal(r.get(k), sd[k]), k
    with pytest.raises(KeyError, match="nope"):
        r.get("nope")

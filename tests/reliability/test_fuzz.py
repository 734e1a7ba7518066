"""Property tests with hypothesis: safetensors headers (qru's reader accepts exactly what the
safetensors library accepts, reads the same tensors, and otherwise raises CheckpointError) and
config values (a config loads, with finite RoPE frequencies, or raises ConfigError)."""
import json
import math
import os
import struct
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from qru.model.checkpoint import CheckpointError, ShardReader, load_safetensors, read_safetensors_header
from qru.model.config import ConfigError, LlamaConfig, rope_inv_freq

# Random exploration locally; a fixed example sequence in CI (CI=true), so a landing never fails by chance.
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=bool(os.environ.get("CI")))

DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1, "F64": 8}
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                              max_size=3), max_leaves=8)


@st.composite
def headers(draw):
    """A mostly-valid header (tensors tiling the data) with a few mutations, plus its data bytes."""
    n = draw(st.integers(0, 4))
    header, pos = {}, 0
    for i in range(n):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = math.prod(shape) * DTYPES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                                                json_values))
    for _ in range(draw(st.integers(0, 3))):  # mutations
        if not header:
            break
        name = draw(st.sampled_from(sorted(header)))
        entry = header[name]
        kind = draw(st.sampled_from(["field", "offset", "shape", "drop", "value"]))
        if kind == "value" or not isinstance(entry, dict):
            header[name] = draw(json_values)
        elif kind == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
        elif kind == "offset":
            entry["data_offsets"] = [draw(st.integers(-8, pos + 8)), draw(st.integers(-8, pos + 8))]
        elif kind == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 4), max_size=3))
        else:
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    data = draw(st.binary(min_size=pos, max_size=pos)) + draw(st.sampled_from([b"", b"\0", b"\0" * 4]))
    if draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return header, data


def _write(body: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    return path


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _ours(path):
    try:
        header, _ = read_safetensors_header(path)
    except CheckpointError:
        return None
    out = load_safetensors(path)
    reader = ShardReader(path)
    for k, t in out.items():  # both readers agree (bit for bit: NaN payloads too), reading the file's own bytes
        assert _same_bits(reader.get(k), t)
    return out


def _theirs(path):
    try:
        return load_file(path)
    except Exception:  # noqa: BLE001 - any rejection by the reference library
        return None


@SETTINGS
@given(headers())
def test_header_fuzz_matches_safetensors(case):
    from pathlib import Path

    header, data = case
    head = json.dumps(header).encode()
    path = Path(_write(struct.pack("<Q", len(head)) + head + data))
    try:
        ours, theirs = _ours(path), _theirs(str(path))
        assert (ours is None) == (theirs is None), (header, len(data), ours is None)
        event("accepted" if ours is not None else "rejected")
        if ours is not None:
            assert ours.keys() == theirs.keys()
            for k in ours:
                assert _same_bits(ours[k], theirs[k])
    finally:
        path.unlink()


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1) | st.none())
def test_random_bytes_raise_checkpoint_error(body, length):
    from pathlib import Path

    raw = body if length is None else struct.pack("<Q", length) + body
    path = Path(_write(raw))
    try:
        ours = _ours(path)
        if ours is not None:
            assert _theirs(str(path)) is not None
    finally:
        path.unlink()


BASE = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False, attention_bias=False, mlp_bias=False, torch_dtype="float32")
FIELDS = sorted(BASE) + ["head_dim", "rope_scaling", "eos_token_id", "bos_token_id", "initializer_range",
                         "quantization_config", "attention_dropout", "hidden_act"]
plausible = st.integers(0, 64) | st.floats(0, 100) | st.booleans() | st.sampled_from([1, 2, 4, 8, 16, 32])
rope_values = st.fixed_dictionaries({}, optional={
    "rope_type": st.sampled_from(["default", "linear", "llama3", "yarn", 3]),
    "type": st.sampled_from(["linear", "dynamic"]), "factor": plausible | json_scalars,
    "low_freq_factor": plausible | json_scalars, "high_freq_factor": plausible | json_scalars,
    "original_max_position_embeddings": plausible | json_scalars, "beta_fast": json_scalars})


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), plausible | plausible | json_values | rope_values, max_size=3))
def test_config_fuzz_loads_or_raises_config_error(changes):
    d = {**BASE, **changes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = LlamaConfig.from_dict(d)
        except ConfigError:
            event("rejected")
            return
    event("loaded")
    # what loads is usable: sizes are positive ints, the RoPE frequencies finite and positive
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        v = getattr(cfg, name)
        assert isinstance(v, int) and not isinstance(v, bool) and v > 0
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert isinstance(cfg.tie_word_embeddings, bool)
    inv = rope_inv_freq(cfg)
    assert bool(torch.isfinite(inv).all()) and bool((inv > 0).all()), (d, inv)
    assert math.isfinite(cfg.rms_norm_eps) and cfg.rms_norm_eps > 0
    LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # and round-trips


def test_real_transformers_llama_configs_load():
    from transformers import LlamaConfig as HFConfig

    for kw in ({}, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
               {"rope_scaling": {"type": "linear", "factor": 2.0}}, {"tie_word_embeddings": True, "head_dim": 64},
               {"num_key_value_heads": 8, "attention_bias": True, "mlp_bias": True}):
        hf = json.loads(HFConfig(**kw).to_json_string())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no key of a real config is unknown to qru
            cfg = LlamaConfig.from_dict(hf)
        for k in ("vocab_size", "hidden_size", "num_key_value_heads", "tie_word_embeddings", "attention_bias"):
            assert getattr(cfg, k) == hf[k]
        want = kw.get("rope_scaling", {}).get("rope_type", kw.get("rope_scaling", {}).get("type", "default"))
        assert cfg.rope_type == want
    with pytest.raises(ConfigError, match="rope type 'dynamic'"):
        LlamaConfig.from_dict(json.loads(HFConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
                                         .to_json_string()))

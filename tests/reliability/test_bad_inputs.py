"""A table of malformed inputs, each run through the real CLI in-process (``qru.cli.main``):
every one must exit 2 with a single ``qru <command>: error: ...`` line that names the culprit
(file, tensor, field or option), and never print a traceback or torch's weights_only advice.

Each case builds its bad input from the tiny checkpoint (``tiny_dir``) in a fresh directory; the
oracle is the culprit's name, which the message must contain."""
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qru.cli import main
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.model.lora import apply_lora, save_adapter
from qru.quant.export import quantize_checkpoint
from qru.train.state import work_dir

pytestmark = pytest.mark.usefixtures("one_thread")


# -- builders: each returns (argv, [substrings the error line must contain]) ---------------

def _copy(tiny_dir, tmp, name="m"):
    d = tmp / name
    shutil.copytree(tiny_dir, d)
    return d


def _raw_safetensors(path, header, data=b""):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def _quantize(d, tmp, *extra):
    return ["quantize", str(d), "--format", "int8", "--no-progress", "--out", str(tmp / "q"), *extra]


def _header_case(header, data=b""):
    def build(tiny_dir, tmp, ctx):
        d = _copy(tiny_dir, tmp)
        _raw_safetensors(d / "model.safetensors", header, data)
        return _quantize(d, tmp), ["model.safetensors"]
    return build


def _config_case(edit, culprit):
    def build(tiny_dir, tmp, ctx):
        d = _copy(tiny_dir, tmp)
        cfg = json.loads((d / "config.json").read_text())
        text = edit(cfg)
        (d / "config.json").write_bytes(text if isinstance(text, bytes) else json.dumps(text).encode())
        return _quantize(d, tmp), ["config.json", *culprit]
    return build


def _with(key, value):
    def edit(cfg):
        cfg[key] = value
        return cfg
    return edit


def _state_dict_case(mutate, culprit, command="quantize"):
    def build(tiny_dir, tmp, ctx):
        d = _copy(tiny_dir, tmp)
        sd = load_file(d / "model.safetensors")
        mutate(sd)
        save_file(sd, d / "model.safetensors")
        if command == "quantize":
            return _quantize(d, tmp), ["model.safetensors", culprit]
        return _eval(d, tmp, ctx), [culprit]
    return build


def _eval(d, tmp, ctx, *extra):
    return ["eval", str(d), "--benchmark", "muse", "--data", str(ctx["muse"]), "--limit", "1",
            "--out", str(tmp / "e.json"), *extra]


def _index_case(weight_map, culprit):
    def build(tiny_dir, tmp, ctx):
        d = _copy(tiny_dir, tmp)
        elsewhere = tmp / "elsewhere"
        elsewhere.mkdir()
        shutil.move(d / "model.safetensors", elsewhere / "model.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map(d)}))
        return _quantize(d, tmp), ["model.safetensors.index.json", culprit]
    return build


def _adapter_case(edit_cfg=None, edit_sd=None, raw=None, culprit=()):
    def build(tiny_dir, tmp, ctx):
        a = tmp / "a"
        shutil.copytree(ctx["adapter"], a)
        if edit_cfg is not None:
            cfg = json.loads((a / "adapter_config.json").read_text())
            (a / "adapter_config.json").write_text(json.dumps(edit_cfg(cfg)))
        if edit_sd is not None:
            sd = load_file(a / "adapter_model.safetensors")
            save_file(edit_sd(sd), a / "adapter_model.safetensors")
        if raw is not None:
            raw(a / "adapter_model.safetensors")
        return ["quantize", str(tiny_dir), "--adapter", str(a), "--format", "nf4", "--no-progress",
                "--out", str(tmp / "q")], list(culprit)
    return build


def _cfg_set(**kv):
    def edit(cfg):
        cfg.update(kv)
        return cfg
    return edit


def _unlearn(tiny_dir, ctx, out, *extra, forget=None):
    return ["unlearn", "--model", str(tiny_dir), "--forget", str(forget or ctx["forget"]), "--method", "ga",
            "--reg", "none", "--mode", "lora", "--rank", "2", "--epochs", "1", "--batch-size", "2", "--max-len", "128",
            "--precision", "fp32", "--eval-samples", "2", "--no-progress", "--cache-dir", str(ctx["cache"]),
            "--out", str(out), *extra]


def _data_case(content, culprit, suffix=".jsonl"):
    def build(tiny_dir, tmp, ctx):
        f = tmp / f"forget{suffix}"
        f.write_bytes(content)
        return _unlearn(tiny_dir, ctx, tmp / "o", forget=f), [f.name, *culprit]
    return build


def _small_vocab_model(tiny_dir, tmp):
    d = tmp / "small_vocab"
    cfg = LlamaConfig.from_json(tiny_dir).replace(vocab_size=128)
    Llama(cfg).save_pretrained(d)
    shutil.copy(tiny_dir / "tokenizer.model", d / "tokenizer.model")
    return d


def _truncate(path):
    b = path.read_bytes()
    path.write_bytes(b[: len(b) - 100])


def _corrupt_resume(which):
    def build(tiny_dir, tmp, ctx):
        out = tmp / "o"
        argv = _unlearn(tiny_dir, ctx, out, "--epochs", "2", "--stop-after", "1")
        assert main(argv) == 0
        f = next(work_dir(out).rglob(which))  # the stopped run's newest checkpoint
        data = f.read_bytes()  # same size (a size mismatch marks the checkpoint incomplete), garbage head
        bad = b"\x80\x04not a pickle" if which == "state.pt" else b"\xff" * 200
        f.write_bytes(bad + data[len(bad):])
        return _unlearn(tiny_dir, ctx, out, "--epochs", "2", "--resume"), [which, "corrupt"]
    return build


def _muse_not_utf8(tiny_dir, tmp, ctx):
    d = tmp / "muse"
    shutil.copytree(ctx["muse"], d)
    (d / "verbmem" / "forget.json").write_bytes(b"[\xff\xfe]")
    argv = _eval(tiny_dir, tmp, ctx)
    argv[argv.index("--data") + 1] = str(d)
    return argv, ["verbmem/forget.json", "UTF-8"]


def _nan_adapter(ctx, tmp):
    a = tmp / "nan_adapter"
    shutil.copytree(ctx["adapter"], a)
    sd = load_file(a / "adapter_model.safetensors")
    next(v for k, v in sd.items() if "lora_B" in k)[0, 0] = float("nan")
    save_file(sd, a / "adapter_model.safetensors")
    return a


def _quantized_eval(tiny_dir, tmp, ctx):
    q = quantize_checkpoint(tiny_dir, tmp / "nf4", "nf4")
    return _eval(q, tmp, ctx, "--precision", "fp32,int8"), ["already quantized (nf4", "--precision nf4"]


KEY = "model.layers.0.self_attn.q_proj.weight"
CASES = {
    # safetensors headers and data
    "header_is_a_list": _header_case([1, 2]),
    "header_entry_not_object": _header_case({"w": 3}),
    "negative_offsets": _header_case({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4),
    "begin_after_end": _header_case({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
    "overlapping_tensors": _header_case({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "gap_between_tensors": _header_case({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12),
    "offsets_past_end": _header_case({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "trailing_bytes": _header_case({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12),
    "negative_shape": _header_case({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
    "unknown_dtype": _header_case({"a": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
    "shape_size_mismatch": _header_case({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "nan_weight": _state_dict_case(lambda sd: sd[KEY].__setitem__((1, 2), float("nan")), KEY),
    "int_weight_quantize": _state_dict_case(lambda sd: sd.__setitem__(KEY, sd[KEY].to(torch.int32)), KEY),
    "int_weight_eval": _state_dict_case(lambda sd: sd.__setitem__(KEY, sd[KEY].to(torch.int32)), KEY, "eval"),
    "index_escapes_dir": _index_case(lambda d: {KEY: "../elsewhere/model.safetensors"}, "../elsewhere"),
    "index_absolute_path": _index_case(lambda d: {KEY: str(d.parent / "elsewhere" / "model.safetensors")},
                                       "elsewhere"),
    "index_weight_map_list": _index_case(lambda d: ["model.safetensors"], "weight_map"),
    "index_weight_map_values": _index_case(lambda d: {KEY: 3}, "weight_map"),
    # configs
    "config_missing": lambda t, tmp, ctx: ((_copy(t, tmp) / "config.json").unlink() or _quantize(tmp / "m", tmp),
                                           ["config.json"]),
    "config_is_a_list": _config_case(lambda c: [c], ["JSON object"]),
    "config_not_json": _config_case(lambda c: b"\xff\xfe{", ["malformed JSON"]),
    "config_bool_as_string": _config_case(_with("tie_word_embeddings", "no"), ["tie_word_embeddings"]),
    "config_rope_factor_zero": _config_case(_with("rope_scaling", {"rope_type": "linear", "factor": 0}),
                                            ["rope_scaling.factor"]),
    "config_rope_type_unknown": _config_case(_with("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
                                             ["rope_scaling", "dynamic"]),
    "config_heads_not_dividing": _config_case(_with("num_attention_heads", 3), ["num_attention_heads"]),
    "config_float_size": _config_case(_with("hidden_size", 64.0), ["hidden_size"]),
    "config_eps_zero": _config_case(lambda c: json.dumps({**c, "rms_norm_eps": 0}).encode(), ["rms_norm_eps"]),
    "config_sliding_window": _config_case(_with("sliding_window", 16), ["sliding_window"]),
    # adapters
    "adapter_empty": _adapter_case(edit_sd=lambda sd: {}, culprit=["adapter_model.safetensors", "no tensors"]),
    "adapter_truncated": _adapter_case(raw=_truncate, culprit=["adapter_model.safetensors", "truncated"]),
    "adapter_layers_to_transform": _adapter_case(_cfg_set(layers_to_transform=[0]),
                                                 culprit=["adapter_config.json", "layers_to_transform"]),
    "adapter_use_dora": _adapter_case(_cfg_set(use_dora=True), culprit=["adapter_config.json", "use_dora"]),
    "adapter_modules_to_save": _adapter_case(_cfg_set(modules_to_save=["lm_head"]), culprit=["modules_to_save"]),
    "adapter_bias": _adapter_case(_cfg_set(bias="all"), culprit=["'bias'"]),
    "adapter_config_list": _adapter_case(lambda c: [c], culprit=["adapter_config.json", "JSON object"]),
    "adapter_rank_string": _adapter_case(_cfg_set(r="8"), culprit=["adapter_config.json", "'r'"]),
    "adapter_unknown_module": _adapter_case(
        edit_sd=lambda sd: {k.replace("layers.0", "layers.9"): v for k, v in sd.items()},
        culprit=["model.layers.9.self_attn.v_proj"]),
    "adapter_int_tensor": _adapter_case(edit_sd=lambda sd: {k: v.to(torch.int8) for k, v in sd.items()},
                                        culprit=["lora_", "dtype"]),
    # data
    "data_empty": _data_case(b"", ["empty"]),
    "data_not_utf8": _data_case(b'{"question": "\xff\xfe", "answer": "x"}\n', []),
    "data_json_not_records": _data_case(b'{"a": 1}', [], suffix=".json"),
    "data_json_list_of_numbers": _data_case(b"[1, 2, 3]", ["record 0", "not a string"], suffix=".json"),
    "eval_data_not_utf8": _muse_not_utf8,
    "pretrain_config_missing": lambda t, tmp, ctx: (
        ["pretrain", "--data", str(ctx["forget"]), "--config", str(tmp / "no.json"), "--train-tokenizer", "300",
         "--out", str(tmp / "p")], ["no.json"]),
    "pretrain_config_unknown_preset": lambda t, tmp, ctx: (
        ["pretrain", "--data", str(ctx["forget"]), "--config", "huge", "--train-tokenizer", "300",
         "--out", str(tmp / "p")], ["preset 'huge'"]),
    # CLI options and run state
    "tokenizer_larger_than_vocab_unlearn": lambda t, tmp, ctx: (
        _unlearn(_small_vocab_model(t, tmp), ctx, tmp / "o"), ["vocab_size=128", "tokenizer"]),
    "tokenizer_larger_than_vocab_eval": lambda t, tmp, ctx: (
        _eval(_small_vocab_model(t, tmp), tmp, ctx), ["vocab_size=128", "tokenizer"]),
    "out_is_a_file_unlearn": lambda t, tmp, ctx: ((tmp / "f").write_text("x") and _unlearn(t, ctx, tmp / "f"), [str(tmp / "f")]),
    "device_bogus_unlearn": lambda t, tmp, ctx: (_unlearn(t, ctx, tmp / "o", "--device", "bogus"), ["--device", "bogus"]),
    "device_bogus_eval": lambda t, tmp, ctx: (_eval(t, tmp, ctx, "--device", "bogus"), ["--device", "bogus"]),
    "out_is_a_file_quantize": lambda t, tmp, ctx: ((tmp / "f").write_text("x") and _quantize(t, tmp, "--out", str(tmp / "f")),
                                                   ["--out", str(tmp / "f"), "not a directory"]),
    "out_is_a_dir_eval": lambda t, tmp, ctx: (_eval(t, tmp, ctx, "--out", str(tmp)), ["--out", "is a directory"]),
    "out_below_a_file_eval": lambda t, tmp, ctx: ((tmp / "f").write_text("x") and _eval(t, tmp, ctx, "--out", str(tmp / "f" / "r.json")),
                                                  [str(tmp / "f"), "is a file"]),
    "nan_adapter_survival": lambda t, tmp, ctx: (
        ["survival", str(t), "--adapter", str(_nan_adapter(ctx, tmp)), "--format", "int8", "--quiet", "--out",
         str(tmp / "s")], ["adapter_model.safetensors", "lora_B", "non-finite"]),
    "nan_adapter_eval": lambda t, tmp, ctx: (
        _eval(t, tmp, ctx, "--adapter", str(_nan_adapter(ctx, tmp))), ["adapter_model.safetensors", "non-finite"]),
    "resume_corrupt_state": _corrupt_resume("state.pt"),
    "resume_corrupt_optimizer": _corrupt_resume("optimizer.pt"),
    "resume_corrupt_trainable": _corrupt_resume("trainable.safetensors"),
    "eval_quantized_at_other_precision": _quantized_eval,
}
CASES["header_not_json"] = lambda t, tmp, ctx: _header_bytes(t, tmp, b"{not json")
CASES["header_length_huge"] = lambda t, tmp, ctx: _header_bytes(t, tmp, None)


def _header_bytes(tiny_dir, tmp, body):
    d = _copy(tiny_dir, tmp)
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}" if body is None else struct.pack("<Q", len(body)) + body)
    return _quantize(d, tmp), ["model.safetensors", "corrupt safetensors header"]


@pytest.fixture(scope="module")
def ctx(tiny_dir, shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    lines = (shared_data / "tofu" / "forget01.json").read_text(encoding="utf-8").splitlines()
    (d / "forget.jsonl").write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    model = Llama.from_pretrained(tiny_dir)
    apply_lora(model, targets=["v_proj"], r=2, seed=0)
    save_adapter(model, d / "adapter")
    return {"forget": d / "forget.jsonl", "cache": d / "cache", "adapter": d / "adapter",
            "muse": shared_data / "muse-news"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(case, tiny_dir, ctx, tmp_path, capsys):
    argv, culprits = CASES[case](tiny_dir, tmp_path, ctx)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2, err
    assert len(errors) == 1 and errors[0].startswith(f"qru {argv[0]}: error: "), err
    assert err.rstrip().endswith(errors[0]), err  # nothing after the message
    assert "Traceback" not in err and "weights_only" not in err, err
    for c in culprits:
        assert c in errors[0], (c, errors[0])
    assert not (tmp_path / "q").exists()


def test_unexpected_errors_still_show_a_traceback(tiny_dir, tmp_path, capsys, monkeypatch):
    import qru.quant.export as E

    def boom(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(E, "quantize_checkpoint", boom)
    rc = main(["quantize", str(tiny_dir), "--format", "int8", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 1 and "please report it" in err and "Traceback" in err and "KeyError: 'a bug'" in err


def test_quantized_checkpoint_is_evaluated_as_stored(tiny_dir, tmp_path):
    """At its own precision a quantized checkpoint is evaluated as loaded (not re-quantized or cast)."""
    from qru.eval.precision import eval_at_precisions

    q = quantize_checkpoint(tiny_dir, tmp_path / "nf4", "nf4", skip=())
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = Llama.from_pretrained(q)(ids)
        recs = eval_at_precisions(q, None, "nf4", lambda m, p: {"logits": m(ids)})
    assert [r["precision"] for r in recs] == ["nf4"]
    assert torch.equal(recs[0]["logits"], want)
    with pytest.raises(ValueError, match=r"already quantized \(nf4.*not bf16"):
        eval_at_precisions(q, None, "bf16", lambda m, p: {})

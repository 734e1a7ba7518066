"""qru.quant.survival: constructed cases per format, a numpy oracle, aggregation as the metric
of the concatenated group, adapter == merged checkpoint, calibration inputs vs full-model
forward hooks, JSON schema, CLI end to end, clear errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qru.data import DataError
from qru.kernels import quant4
from qru.model.checkpoint import CheckpointError, load_state_dict, save_state_dict
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.quant import FORMATS, dequantize, quantize
from qru.quant import survival as S
from qru.quant.qlinear import split_linears

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCK = {"nf4": 64, "fp4": 64, "int4": 128, "int4_sym": 128, "int8": None}
TOP_KEYS = {"format", "block_size", "layers", "by_module_type", "by_layer_index", "overall"}
ROW_KEYS = {"name", *S.METRICS}


pytestmark = pytest.mark.usefixtures("one_thread")


def _m(w, wp, fmt, x=None):
    return S.metrics(S.chunk_sums(w, wp, fmt, BLOCK[fmt], x), out=x is not None)


# ----------------------------------------------------------------------------- constructed cases


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_delta_no_flips_null_ratios(fmt):
    w = torch.randn(16, 256) * 0.02
    m = _m(w, w.clone(), fmt, x=torch.randn(5, 256))
    assert m["code_flip_frac"] == 0 and m["delta_rel_norm"] == 0 and m["below_half_step_frac"] == 1
    for k in ("survival_ratio", "cosine", "projection", "out_cosine", "out_rel_err"):
        assert m[k] is None


def _extremes(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Elements that set their block's scale (absmax; int4: group min and max)."""
    if fmt in ("nf4", "fp4"):
        b = w.reshape(-1, BLOCK[fmt])
        return (b.abs() == b.abs().amax(1, keepdim=True)).reshape(w.shape)
    g = w.reshape(w.shape[0], -1, BLOCK[fmt] or w.shape[1])
    if fmt == "int4":
        mask = (g == g.amax(-1, keepdim=True)) | (g == g.amin(-1, keepdim=True))
    else:
        mask = g.abs() == g.abs().amax(-1, keepdim=True)
    return mask.reshape(w.shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_delta_below_half_step_does_not_survive(fmt):
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(32, 256, generator=g) * 0.02
    w = dequantize(quantize(w0, fmt, BLOCK[fmt]), torch.float32)  # weights on the grid
    sign = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
    step = S.local_step(quantize(w, fmt, BLOCK[fmt]), sign).reshape(w.shape)
    delta = 0.4 * step * sign
    delta[_extremes(w, fmt)] = 0.0  # keep every block's scale
    assert (delta != 0).float().mean() > 0.8
    s = S.chunk_sums(w, w + delta, fmt, BLOCK[fmt])
    m = S.metrics(s, False)
    assert s.flips == 0 and s.q2 == 0
    assert m["survival_ratio"] == 0 and m["projection"] == 0 and m["cosine"] == 0
    assert m["below_half_step_frac"] == 1
    assert m["delta_rel_norm"] > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_delta_of_many_steps_survives(fmt):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 512, generator=g) * 0.02
    wp = w + torch.randn(w.shape, generator=g) * 0.2
    m = _m(w, wp, fmt)
    assert m["below_half_step_frac"] < 0.05  # the update spans several steps
    assert m["survival_ratio"] == pytest.approx(1, abs=0.02)
    assert m["projection"] == pytest.approx(1, abs=0.02)
    assert m["cosine"] > 0.98
    assert m["code_flip_frac"] > 0.8


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(6, 256), (5, 96), (3, 80)])
def test_below_half_step_and_flips_match_elementwise(fmt, shape):
    """The fast counts (broadcast steps, xor of packed bytes) equal element-wise ones, also
    with partial blocks / groups."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(shape, generator=g) * 0.02
    d = torch.randn(shape, generator=g) * 0.003 * (torch.rand(shape, generator=g) < 0.7)
    qa, qb = quantize(w, fmt, BLOCK[fmt] and 64), quantize(w + d, fmt, BLOCK[fmt] and 64)
    step = S.local_step(qa, d)
    ref = int(((d.reshape(-1).abs() < 0.5 * step) | (d.reshape(-1) == 0)).sum())
    assert S.below_half_step(qa, d) == ref and 0 < ref < d.numel()
    assert S.code_flips(qa, qb) == int((S.codes(qa) != S.codes(qb)).sum()) > 0


def test_int8_hand_computed():
    # row absmax 1 -> scale 1/127; 0.5*127 = 63.5 rounds to 64, 0.51*127 = 64.77 to 65.
    w = torch.tensor([[1.0, 0.5, -0.25, 0.0]])
    wp = torch.tensor([[1.0, 0.51, -0.25, 0.0]])
    s = S.chunk_sums(w, wp, "int8", None)
    m = S.metrics(s, False)
    d = float(np.float32(0.51) - np.float32(0.5))
    scale = float(np.float32(1.0) / np.float32(127.0))
    assert s.flips == 1 and m["code_flip_frac"] == 0.25
    assert m["below_half_step_frac"] == 0.75  # the update (0.01) is above half a step (0.0039)
    assert m["survival_ratio"] == pytest.approx(scale / d, rel=1e-6)
    assert m["projection"] == pytest.approx(scale / d, rel=1e-6)
    assert m["cosine"] == pytest.approx(1.0, rel=1e-6)
    assert m["delta_rel_norm"] == pytest.approx(d / math.sqrt(1 + 0.25 + 0.0625), rel=1e-6)


def _np_codes(q, fmt):
    data = q.data.numpy()
    if fmt == "int8":
        return data.view(np.int8).astype(np.int64)
    c = np.stack([data >> 4, data & 15], 1).reshape(-1)[: math.prod(q.shape)].astype(np.int64)
    if fmt == "fp4":  # compare decoded codebook values: the two +0.0 codes are one
        return np.asarray(quant4.FP4_CODE, np.float32)[c]
    return c


def _np_step(q, fmt, delta):
    n = math.prod(q.shape)
    if fmt in ("nf4", "fp4"):
        book = np.asarray(quant4.NF4_CODE if fmt == "nf4" else quant4.FP4_CODE, np.float32)
        levels = np.unique(book)
        v = book[_np_codes_raw(q)]
        step = np.empty(n, np.float32)
        absmax = np.repeat(q.absmax().numpy(), q.block_size)[:n]
        for i in range(n):
            j = int(np.searchsorted(levels, v[i]))
            up = levels[j + 1] - levels[j] if j + 1 < len(levels) else levels[j] - levels[j - 1]
            dn = levels[j] - levels[j - 1] if j > 0 else levels[j + 1] - levels[j]
            step[i] = (up if delta[i] > 0 else dn) * absmax[i]
        return step
    rows, inner = q.shape
    sc = q.scales.numpy().reshape(rows, -1)
    col_group = np.arange(inner) // (q.block_size if fmt != "int8" else inner)
    return sc[:, col_group].reshape(-1)


def _np_codes_raw(q):
    data = q.data.numpy()
    return np.stack([data >> 4, data & 15], 1).reshape(-1)[: math.prod(q.shape)].astype(np.int64)


@pytest.mark.parametrize("fmt", FORMATS)
def test_metrics_match_numpy(fmt):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 256, generator=g) * 0.02
    wp = w + torch.randn(w.shape, generator=g) * 0.002 * (torch.rand(w.shape, generator=g) < 0.5)
    x = torch.randn(7, 256, generator=g)
    m = _m(w, wp, fmt, x)
    qa, qb = quantize(w, fmt, BLOCK[fmt]), quantize(wp, fmt, BLOCK[fmt])
    W, D = w.double().numpy(), (wp - w).double().numpy()
    Q = (qb.dequantize(torch.float32) - qa.dequantize(torch.float32)).double().numpy()
    X = x.double().numpy()
    flips = np.mean(_np_codes(qa, fmt) != _np_codes(qb, fmt))
    step = _np_step(qa, fmt, D.reshape(-1))
    below = np.mean((np.abs((wp - w).numpy().reshape(-1)) < 0.5 * step) | (D.reshape(-1) == 0))
    yd, yq = X @ D.T, X @ Q.T
    ref = {"delta_rel_norm": np.linalg.norm(D) / np.linalg.norm(W), "code_flip_frac": flips,
           "survival_ratio": np.linalg.norm(Q) / np.linalg.norm(D),
           "cosine": np.sum(Q * D) / (np.linalg.norm(Q) * np.linalg.norm(D)),
           "below_half_step_frac": below, "projection": np.sum(Q * D) / np.sum(D * D),
           "out_cosine": np.sum(yq * yd) / (np.linalg.norm(yq) * np.linalg.norm(yd)),
           "out_rel_err": np.linalg.norm(yq - yd) / np.linalg.norm(yd)}
    assert 0 < flips < 1 and 0 < below < 1
    for k, v in ref.items():
        assert m[k] == pytest.approx(float(v), rel=1e-5, abs=1e-12), k


def test_fp4_signed_zero_codes_are_not_flips():
    # A zero weight nudged up moves from code 0 to code 8; both decode to +0.0.
    w = torch.zeros(1, 64)
    w[0, 0] = 1.0
    wp = w.clone()
    wp[0, 1:] = 1e-3  # below fp4's smallest magnitude / 2 (0.0026 * absmax)
    qa, qb = quantize(w, "fp4"), quantize(wp, "fp4")
    assert (_np_codes_raw(qa) != _np_codes_raw(qb)).sum() == 63  # raw codes do change
    s = S.chunk_sums(w, wp, "fp4", 64)
    assert s.flips == 0 and s.q2 == 0 and s.below == 64


# ----------------------------------------------------------------------------- checkpoints


def _save_unlearned(base: Path, out: Path, scale: float = 0.002, frozen=("model.layers.1.self_attn.k_proj",), seed=5):
    sd = {k: v.clone() for k, v in load_state_dict(base).items()}
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if v.dim() == 2 and "embed" not in k and not any(k.startswith(f + ".") for f in frozen):
            v += torch.randn(v.shape, generator=g).to(v.dtype) * scale
    save_state_dict(sd, out, extra_files={"config.json": (base / "config.json").read_text()})
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny base (fp32, no tokenizer) and an unlearned copy (layer 1 k_proj unchanged)."""
    root = tmp_path_factory.mktemp("surv")
    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny"))
    model.save_pretrained(root / "base")
    _save_unlearned(root / "base", root / "unl")
    return root / "base", root / "unl"


def _concat_metrics(base, unl, names, fmt):
    """Oracle for an aggregate: the metrics of the concatenated tensors, in numpy."""
    bs, us = load_state_dict(base), load_state_dict(unl)
    Ws, Ds, Qs, flips, n = [], [], [], 0, 0
    for k in names:
        w, wp = bs[k].float(), us[k].float()
        qa, qb = quantize(w, fmt, BLOCK[fmt]), quantize(wp, fmt, BLOCK[fmt])
        Ws.append(w.double().numpy().ravel())
        Ds.append((wp - w).double().numpy().ravel())
        Qs.append((qb.dequantize(torch.float32) - qa.dequantize(torch.float32)).double().numpy().ravel())
        flips += int((_np_codes(qa, fmt) != _np_codes(qb, fmt)).sum())
        n += w.numel()
    W, D, Q = map(np.concatenate, (Ws, Ds, Qs))
    return {"delta_rel_norm": np.linalg.norm(D) / np.linalg.norm(W), "code_flip_frac": flips / n,
            "survival_ratio": np.linalg.norm(Q) / np.linalg.norm(D), "projection": Q @ D / (D @ D),
            "cosine": Q @ D / (np.linalg.norm(Q) * np.linalg.norm(D)), "numel": n, "n_tensors": len(names)}


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_aggregates_are_metrics_of_concatenation(ckpts, fmt):
    base, unl = ckpts
    rep = S.analyze(base, unl, formats=[fmt], progress=False)[fmt]
    names = [r["name"] + ".weight" for r in rep["layers"]]
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    groups = {("by_module_type", "q_proj"): [n for n in names if ".q_proj." in n],
              ("by_module_type", "k_proj"): [n for n in names if ".k_proj." in n],
              ("by_layer_index", "1"): [n for n in names if ".layers.1." in n]}
    for (kind, key), members in groups.items():
        ref = _concat_metrics(base, unl, members, fmt)
        got = rep[kind][key]
        for k, v in ref.items():
            assert got[k] == pytest.approx(float(v), rel=1e-6), (kind, key, k)
    ref = _concat_metrics(base, unl, names, fmt)
    for k, v in ref.items():
        assert rep["overall"][k] == pytest.approx(float(v), rel=1e-6), k
    # the unchanged tensor: nulls in its row, and it only adds elements to its group's fractions
    row = next(r for r in rep["layers"] if r["name"] == "model.layers.1.self_attn.k_proj")
    assert row["survival_ratio"] is None and row["cosine"] is None and row["projection"] is None
    assert row["code_flip_frac"] == 0 and row["below_half_step_frac"] == 1 and row["delta_rel_norm"] == 0


def test_chunked_equals_whole_tensor(ckpts):
    base, unl = ckpts
    fmts = ["nf4", "fp4", "int4", "int4_sym", "int8"]
    whole = S.analyze(base, unl, formats=fmts, progress=False)
    # 64 elements per chunk: down_proj (176 columns) needs chunks of 4 rows for 64-blocks
    assert S.row_chunk((64, 176), ["nf4"], {"nf4": 64}, 64) == 4
    chunked = S.analyze(base, unl, formats=fmts, progress=False, chunk_elems=64)
    for f in fmts:
        for a, b in zip(whole[f]["layers"], chunked[f]["layers"]):
            assert a["name"] == b["name"]
            assert a["code_flip_frac"] == b["code_flip_frac"] and a["below_half_step_frac"] == b["below_half_step_frac"]
            for k in ("survival_ratio", "projection", "cosine", "delta_rel_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-5) if a[k] is not None else b[k] is None


def test_json_schema_single_and_multi(ckpts, tmp_path):
    base, unl = ckpts
    single = S.analyze(base, unl, formats="int4", block_size=64, progress=False)
    assert set(single) == {"int4"}  # {format: report}, also for one format
    one = single["int4"]
    assert set(one) == TOP_KEYS and one["format"] == "int4" and one["block_size"] == 64
    assert all(set(r) == ROW_KEYS for r in one["layers"])
    assert set(one["by_module_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(one["by_layer_index"]) == {"0", "1"}
    assert set(one["overall"]) == {*S.METRICS, "n_tensors", "numel"}
    multi = S.analyze(base, unl, formats=["nf4", "int8"], progress=False)
    assert set(multi) == {"nf4", "int8"}
    for f, rep in multi.items():
        assert set(rep) == TOP_KEYS and rep["format"] == f and all(set(r) == ROW_KEYS for r in rep["layers"])
    assert multi["int8"]["block_size"] is None and multi["nf4"]["block_size"] == 64
    paths = S.write_outputs(multi, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == sorted(S.FILES)
    assert json.loads(paths["survival.json"].read_text()) == multi
    lines = paths["survival.csv"].read_text().splitlines()
    assert len(lines) == 1 + 2 * 14 and lines[0].startswith("format,block_size,name,layer_index,module_type")
    for p in ("survival_heatmap.png", "survival_bars.png"):
        assert paths[p].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert S.by_format(one) == {"int4": one} == S.by_format(single)  # also reads a pre-{format: report} file
    assert "overall" in S.summary_table(multi)


def test_skip_includes_lm_head_when_asked(ckpts):
    base, unl = ckpts
    rep = S.analyze(base, unl, formats="int8", skip=(), progress=False)["int8"]
    assert rep["layers"][-1]["name"] == "lm_head"
    assert "lm_head" in rep["by_module_type"] and "lm_head" not in rep["by_layer_index"]
    rep = S.analyze(base, unl, formats="int8", skip=("mlp", "*.q_proj"), progress=False)["int8"]
    assert {S.module_type(r["name"]) for r in rep["layers"]} == {"k_proj", "v_proj", "o_proj", "lm_head"}


@pytest.mark.parametrize("skip", [("layers.0.mlp",), ("lm_head", "layers.1.self_attn.q_proj"), ("*.k_proj", "mlp")])
def test_skip_matches_quantize(ckpts, skip):
    """survival analyses exactly the linears that ``qru quantize --skip`` quantizes (one matcher)."""
    base, unl = ckpts
    rep = S.analyze(base, unl, formats="int8", skip=skip, progress=False)["int8"]
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_json(base / "config.json"))
    targets, skipped = split_linears(model, skip)
    assert sorted(r["name"] for r in rep["layers"]) == sorted(n for n, _ in targets)
    if skip == ("layers.0.mlp",):  # by hand: the three MLP linears of layer 0, and nothing else
        assert skipped == [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]


@pytest.fixture(scope="module")
def adapter_case(tmp_path_factory, ckpts):
    """A random LoRA adapter on q/v/down_proj and the checkpoint it merges to (fp32)."""
    from qru.model.lora import apply_lora, save_adapter
    from qru.model.peft import merge_state_dict, read_adapter

    base, _ = ckpts
    root = tmp_path_factory.mktemp("adapter")
    model = Llama.from_pretrained(base)
    apply_lora(model, targets=["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, root / "adapter")
    cfg, asd = read_adapter(root / "adapter")
    merged = merge_state_dict(load_state_dict(base), asd, cfg)
    save_state_dict(merged, root / "merged", extra_files={"config.json": (base / "config.json").read_text()})
    return root / "adapter", root / "merged"


def test_adapter_equals_merged_checkpoint(ckpts, adapter_case):
    base, _ = ckpts
    adapter, merged = adapter_case
    fmts = ["nf4", "int4_sym"]
    a = S.analyze(base, adapter=adapter, formats=fmts, progress=False)
    b = S.analyze(base, merged, formats=fmts, progress=False)
    c = S.analyze(base, base, adapter=adapter, formats=fmts, progress=False)  # adapter on top of W' = W
    assert a == b == c
    rows = {r["name"]: r for r in a["nf4"]["layers"]}
    assert rows["model.layers.0.self_attn.q_proj"]["survival_ratio"] is not None
    assert rows["model.layers.0.self_attn.k_proj"]["survival_ratio"] is None  # not in the adapter


# ----------------------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def tok_ckpts(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("surv_tok")
    base = tiny_checkpoint(shared_data, root)
    unl = _save_unlearned(base, root / "unl", scale=0.004)
    calib = root / "calib.txt"
    calib.write_text(" ".join(json.load(open(shared_data / "muse-news" / "verbmem" / "forget.json"))[0]["gt"]
                              for _ in range(3)))
    return base, unl, calib


def test_streamed_inputs_equal_full_model_hooks(tok_ckpts):
    from qru.model.tokenizer import Tokenizer

    base, _, calib = tok_ckpts
    ids = S.calib_ids(S.calib_texts(calib), Tokenizer.from_dir(base), rows=100, seq_len=32)
    assert ids.shape == (4, 32)
    model = Llama.from_pretrained(base, dtype=torch.float32).eval()
    ref = {}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: ref.__setitem__(n, inp[0].reshape(-1, inp[0].shape[-1])[:100]))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    got = {}
    for _, d in S.stream_inputs(base, ids, 100, final=True):
        got.update(d)
    assert set(got) == set(ref) and len(got) == 15
    p = "model.layers.1."
    assert got[p + "self_attn.q_proj"] is got[p + "self_attn.v_proj"]  # one shared input, stored once
    assert got[p + "mlp.gate_proj"] is got[p + "mlp.up_proj"] and got[p + "mlp.up_proj"] is not got[p + "self_attn.q_proj"]
    for n in ref:
        assert got[n].shape == (100, ref[n].shape[1])
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-5)


def test_calib_output_fields_match_direct_computation(tok_ckpts):
    from qru.model.tokenizer import Tokenizer

    base, unl, calib = tok_ckpts
    rows = 80
    rep = S.analyze(base, unl, formats=["nf4", "int8"], calib=calib, calib_rows=rows, calib_seq_len=40,
                    skip=(), progress=False)
    ids = S.calib_ids(S.calib_texts(calib), Tokenizer.from_dir(base), rows, 40)
    model = Llama.from_pretrained(base, dtype=torch.float32).eval()
    X = {}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: X.__setitem__(n, inp[0].reshape(-1, inp[0].shape[-1])[:rows]))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    bs, us = load_state_dict(base), load_state_dict(unl)
    for f in ("nf4", "int8"):
        sums = {}
        for r in rep[f]["layers"]:
            n = r["name"]
            w, wp = bs[n + ".weight"].float(), us[n + ".weight"].float()
            if torch.equal(w, wp):
                assert r["out_cosine"] is None and r["out_rel_err"] is None
                continue
            D = quantize(wp, f, BLOCK[f]).dequantize(torch.float32) - quantize(w, f, BLOCK[f]).dequantize(torch.float32)
            x = X[n].double()
            yd, yq = x @ (wp - w).double().T, x @ D.double().T
            assert r["out_cosine"] == pytest.approx(float((yq * yd).sum() / (yq.norm() * yd.norm())), rel=1e-5), (f, n)
            assert r["out_rel_err"] == pytest.approx(float((yq - yd).norm() / yd.norm()), rel=1e-5)
            t = S.module_type(n)
            a = sums.setdefault(t, [0.0, 0.0, 0.0])
            a[0] += float((yq * yd).sum())
            a[1] += float((yq * yq).sum())
            a[2] += float((yd * yd).sum())
        for t, (qd, qq, dd) in sums.items():
            assert rep[f]["by_module_type"][t]["out_cosine"] == pytest.approx(qd / math.sqrt(qq * dd), rel=1e-5)
        assert set(rep[f]["layers"][0]) == ROW_KEYS | set(S.OUT_METRICS)


def test_calib_texts_formats(tmp_path, shared_data):
    muse = S.calib_texts(shared_data / "muse-news")
    assert len(muse) == sum(len(json.load(open(f))) for f in (shared_data / "muse-news").rglob("*.json"))
    assert any(t.startswith("Question: ") for t in muse)
    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n{"question": "q?", "answer": "a"}\n')
    assert S.calib_texts(tmp_path / "a.jsonl") == ["hello world", "Question: q?\nAnswer: a"]
    (tmp_path / "bad.json").write_text('[{"foo": 1}]')
    with pytest.raises(DataError, match="bad.json: record 0 has no text"):
        S.calib_texts(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- CLI and errors


def _qru(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qru", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def test_cli_end_to_end(tok_ckpts, tmp_path):
    base, unl, calib = tok_ckpts
    r = _qru("survival", base, unl, "--format", "nf4,int8", "--calib", calib, "--calib-rows", 64,
             "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(S.FILES)
    rep = json.loads((tmp_path / "out" / "survival.json").read_text())
    assert set(rep) == {"nf4", "int8"} and "out_cosine" in rep["nf4"]["layers"][0]
    assert "overall" in r.stdout and "[survival 14/14]" in r.stderr


def test_cli_adapter_only_and_errors(ckpts, adapter_case, tmp_path, capsys):
    from qru.cli import main

    base, _ = ckpts
    adapter, _ = adapter_case
    assert main(["survival", str(base), "--adapter", str(adapter), "--format", "int4", "--block-size", "64",
                 "--quiet", "--out", str(tmp_path / "o")]) == 0
    rep = json.loads((tmp_path / "o" / "survival.json").read_text())
    assert set(rep) == {"int4"} and set(rep["int4"]) == TOP_KEYS and rep["int4"]["block_size"] == 64
    assert rep == S.analyze(base, adapter=adapter, formats="int4", block_size=64, progress=False)
    capsys.readouterr()
    assert main(["survival", str(base), "--out", str(tmp_path / "x")]) == 2
    assert "give UNLEARNED, --adapter, or both" in capsys.readouterr().err
    assert main(["survival", str(base), str(base), "--format", "nf5", "--out", str(tmp_path / "x")]) == 2
    assert "unknown format 'nf5'" in capsys.readouterr().err
    assert main(["survival", str(base), str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "unlearned checkpoint directory not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_errors(ckpts, tmp_path):
    base, unl = ckpts
    with pytest.raises(S.SurvivalError, match="unknown format 'int3'"):
        S.analyze(base, unl, formats="nf4,int3")
    with pytest.raises(S.SurvivalError, match="block_size must be a power of two.*48"):
        S.analyze(base, unl, block_size=48)
    with pytest.raises(FileNotFoundError, match="base checkpoint directory not found: .*nope"):
        S.analyze(tmp_path / "nope", unl)
    with pytest.raises(FileNotFoundError, match="unlearned checkpoint directory not found: .*nope"):
        S.analyze(base, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="adapter config not found"):
        S.analyze(base, adapter=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="calibration data not found"):
        S.analyze(base, unl, calib=tmp_path / "nope.txt")
    with pytest.raises(S.SurvivalError, match="unlearned checkpoint, an adapter"):
        S.analyze(base)

    sd = {k: v.clone() for k, v in load_state_dict(unl).items()}
    cfg = {"config.json": (base / "config.json").read_text()}
    bad = dict(sd, **{"model.layers.1.mlp.up_proj.weight": sd["model.layers.1.mlp.up_proj.weight"][:-1]})
    save_state_dict(bad, tmp_path / "shape", extra_files=cfg)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(175, 64\)"):
        S.analyze(base, tmp_path / "shape")
    missing = {k: v for k, v in sd.items() if k != "model.layers.0.mlp.gate_proj.weight"}
    save_state_dict(missing, tmp_path / "missing", extra_files=cfg)
    with pytest.raises(CheckpointError, match="has no tensor 'model.layers.0.mlp.gate_proj.weight'"):
        S.analyze(base, tmp_path / "missing")
    nan = {k: v.clone() for k, v in sd.items()}
    nan["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
    save_state_dict(nan, tmp_path / "nan", extra_files=cfg)
    with pytest.raises(S.SurvivalError, match=r"nan: tensor 'model.layers.1.self_attn.o_proj.weight' has non-finite.*\(3, 5\)"):
        S.analyze(base, tmp_path / "nan", progress=False)
    nan = {k: v.clone() for k, v in load_state_dict(base).items()}
    nan["model.layers.0.mlp.up_proj.weight"][101, 7] = float("inf")
    save_state_dict(nan, tmp_path / "nanbase", extra_files=cfg)
    with pytest.raises(S.SurvivalError, match=r"nanbase: tensor 'model.layers.0.mlp.up_proj.weight' .*\(101, 7\)"):
        S.analyze(tmp_path / "nanbase", unl, progress=False, chunk_elems=256)

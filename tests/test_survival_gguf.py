"""Survival analysis under llama.cpp's GGUF block formats: codes, steps and metrics against a
numpy oracle that unpacks llama.cpp's block structs and dequantizes with gguf.quants."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qru.model.checkpoint import load_state_dict, save_state_dict
from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from qru.quant import GGUF_FORMATS, dequantize, quantize
from qru.quant import survival as S

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1,
         "q4_k": T.Q4_K, "mxfp4": T.MXFP4}
BLOCK = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q4_k": 256, "mxfp4": 32}
SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q4_k": 144, "mxfp4": 17}
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- numpy oracle


def np_codes_steps(q, delta):
    """(codes, local step) per element, unpacking llama.cpp's structs in numpy (mxfp4: codes
    are the E2M1 values, so ±0 are one; step: the gap to the next value in delta's direction)."""
    fmt, n = q.fmt, q.data.numel() // SIZE[q.fmt] * BLOCK[q.fmt]
    b = q.data.numpy().reshape(-1, SIZE[fmt])
    half = lambda c: c.copy().view(np.float16).astype(np.float32).reshape(-1)  # noqa: E731
    nib = lambda qs: np.concatenate([qs & 15, qs >> 4], 1).astype(np.int64)  # noqa: E731
    if fmt == "q8_0":
        codes, step = b[:, 2:].view(np.int8).astype(np.int64), np.repeat(np.abs(half(b[:, :2])), 32)
    elif fmt == "mxfp4":
        c = nib(b[:, 1:])
        d = np.where(b[:, 0] < 2, np.uint32(0x00200000) << b[:, 0].astype(np.uint32),
                     (b[:, 0].astype(np.uint32) - 1) << 23).view(np.float32)
        codes = KVALUES[c]
        levels = np.unique(KVALUES)
        j = np.searchsorted(levels, codes.reshape(-1))
        up = np.where(j + 1 < len(levels), levels[np.minimum(j + 1, len(levels) - 1)] - levels[j],
                      levels[-1] - levels[-2])
        dn = np.where(j > 0, levels[j] - levels[np.maximum(j - 1, 0)], levels[1] - levels[0])
        dl = delta.reshape(-1)
        dl = np.concatenate([dl, np.zeros(n - dl.size, np.float32)])
        step = np.where(dl > 0, up, dn) * np.repeat(d, 32)
    elif fmt == "q4_k":
        d = half(b[:, 0:2])
        s = b[:, 4:16].astype(np.int64)
        sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], 1)
        qs = b[:, 16:].reshape(-1, 4, 32).astype(np.int64)
        codes = np.stack([qs & 15, qs >> 4], 2).reshape(-1, 256)
        step = np.repeat((d[:, None] * sc.astype(np.float32)).reshape(-1), 32)
    else:
        off = 2 if fmt.endswith("_0") else 4
        c = nib(b[:, off + (4 if fmt.startswith("q5") else 0):])
        if fmt.startswith("q5"):
            qh = b[:, off:off + 4].copy().view(np.uint32).reshape(-1, 1)
            c = c | (((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int64) << 4)
        codes, step = c, np.repeat(np.abs(half(b[:, :2])), 32)
    m = int(np.prod(q.shape))
    return codes.reshape(-1)[:m], step.reshape(-1)[:m]


def gguf_deq(q):
    return gguf.quants.dequantize(q.data.numpy().reshape(1, -1), TYPES[q.fmt]).reshape(-1)[: int(np.prod(q.shape))]


def oracle(w, wp, fmt, x=None):
    qa, qb = quantize(w, fmt), quantize(wp, fmt)
    D = (wp - w).double().numpy().reshape(-1)
    Q = (gguf_deq(qb) - gguf_deq(qa)).astype(np.float64)
    ca, step = np_codes_steps(qa, (wp - w).numpy())
    cb, _ = np_codes_steps(qb, (wp - w).numpy())
    W = w.double().numpy().reshape(-1)
    below = np.mean((np.abs((wp - w).numpy().reshape(-1)) < 0.5 * step) | (D == 0))
    ref = {"delta_rel_norm": np.linalg.norm(D) / np.linalg.norm(W), "code_flip_frac": np.mean(ca != cb),
           "survival_ratio": np.linalg.norm(Q) / np.linalg.norm(D),
           "cosine": Q @ D / (np.linalg.norm(Q) * np.linalg.norm(D)), "below_half_step_frac": below,
           "projection": Q @ D / (D @ D)}
    if x is not None:
        X = x.double().numpy()
        yd, yq = X @ D.reshape(w.shape).T, X @ Q.reshape(w.shape).T
        ref["out_cosine"] = np.sum(yq * yd) / (np.linalg.norm(yq) * np.linalg.norm(yd))
        ref["out_rel_err"] = np.linalg.norm(yq - yd) / np.linalg.norm(yd)
    return ref


# ----------------------------------------------------------------------------- per chunk


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
@pytest.mark.parametrize("shape", [(12, 256), (5, 96), (3, 80)])
def test_metrics_match_numpy_oracle(fmt, shape):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g) * 0.02
    wp = w + torch.randn(shape, generator=g) * 0.002 * (torch.rand(shape, generator=g) < 0.5)
    x = torch.randn(7, shape[1], generator=g)
    m = S.metrics(S.chunk_sums(w, wp, fmt, BLOCK[fmt], x), out=True)
    ref = oracle(w, wp, fmt, x)
    assert 0 < ref["code_flip_frac"] < 1 and 0 < ref["below_half_step_frac"] < 1
    for k, v in ref.items():
        assert m[k] == pytest.approx(float(v), rel=1e-5, abs=1e-12), k


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_zero_delta_no_flips_null_ratios(fmt):
    w = torch.randn(16, 256) * 0.02
    m = S.metrics(S.chunk_sums(w, w.clone(), fmt, BLOCK[fmt], torch.randn(5, 256)), out=True)
    assert m["code_flip_frac"] == 0 and m["delta_rel_norm"] == 0 and m["below_half_step_frac"] == 1
    for k in ("survival_ratio", "cosine", "projection", "out_cosine", "out_rel_err"):
        assert m[k] is None


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q5_0", "mxfp4"])
def test_delta_below_half_step_does_not_survive(fmt):
    """Weights on the grid, each moved 0.4 of its local step (the block's extreme kept still):
    nothing flips and nothing survives."""
    g = torch.Generator().manual_seed(1)
    w = dequantize(quantize(torch.randn(32, 256, generator=g) * 0.02, fmt), torch.float32)
    sign = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
    step = S.local_step(quantize(w, fmt), sign).reshape(w.shape)
    delta = 0.4 * step * sign
    b = w.reshape(-1, 32).abs()
    delta.view(-1, 32)[b == b.amax(1, keepdim=True)] = 0.0
    s = S.chunk_sums(w, w + delta, fmt, BLOCK[fmt])
    m = S.metrics(s, False)
    assert s.flips == 0 and s.q2 == 0 and m["below_half_step_frac"] == 1 and m["delta_rel_norm"] > 0


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_delta_of_many_steps_survives(fmt):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 512, generator=g) * 0.02
    wp = w + torch.randn(w.shape, generator=g) * 0.2
    m = S.metrics(S.chunk_sums(w, wp, fmt, BLOCK[fmt]), False)
    assert m["below_half_step_frac"] < 0.1
    assert m["survival_ratio"] == pytest.approx(1, abs=0.05) and m["cosine"] > 0.95
    assert m["code_flip_frac"] > 0.7


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("surv_gguf")
    torch.manual_seed(0)
    Llama(LlamaConfig.preset("tiny")).save_pretrained(root / "base")
    sd = {k: v.clone() for k, v in load_state_dict(root / "base").items()}
    g = torch.Generator().manual_seed(5)
    for k, v in sd.items():
        if v.dim() == 2 and "embed" not in k:
            v += torch.randn(v.shape, generator=g).to(v.dtype) * 0.002
    save_state_dict(sd, root / "unl", extra_files={"config.json": (root / "base" / "config.json").read_text()})
    return root / "base", root / "unl"


def test_analyze_overall_matches_oracle_and_chunking(ckpts):
    base, unl = ckpts
    fmts = ["q4_0", "q4_k", "mxfp4"]
    rep = S.analyze(base, unl, formats=fmts, block_size=64, progress=False)
    chunked = S.analyze(base, unl, formats=fmts, progress=False, chunk_elems=64)
    bs, us = load_state_dict(base), load_state_dict(unl)
    for f in fmts:
        assert rep[f]["block_size"] == BLOCK[f]  # fixed blocks: --block-size does not apply
        for row, crow in zip(rep[f]["layers"], chunked[f]["layers"]):
            k = row["name"] + ".weight"
            ref = oracle(bs[k].float(), us[k].float(), f)
            for key, v in ref.items():
                assert row[key] == pytest.approx(float(v), rel=1e-5, abs=1e-12), (f, k, key)
            assert row["code_flip_frac"] == crow["code_flip_frac"]
            assert row["below_half_step_frac"] == crow["below_half_step_frac"]


def test_cli_survival_gguf_formats(ckpts, tmp_path):
    from qru.cli import main

    base, unl = ckpts
    assert main(["survival", str(base), str(unl), "--format", "q4_0,q4_k,mxfp4", "--quiet",
                 "--out", str(tmp_path / "o")]) == 0
    rep = json.loads((tmp_path / "o" / "survival.json").read_text())
    assert set(rep) == {"q4_0", "q4_k", "mxfp4"}
    assert rep == S.analyze(base, unl, formats="q4_0,q4_k,mxfp4", progress=False)
    with pytest.raises(S.SurvivalError, match="unknown format 'q3_k'"):
        S.analyze(base, unl, formats="q3_k", progress=False)

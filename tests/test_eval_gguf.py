"""GGUF formats everywhere: quantize_model / QuantLinear, qru eval --precision and the demo's
eval.precisions, against a hand-built model whose weights are gguf.quants' dequantized bytes."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import qru.quant as Q
from qru.demo import presets
from qru.eval import muse
from qru.eval import precision as P
from qru.model.llama import Llama
from qru.model.tokenizer import Tokenizer
from qru.quant.qlinear import QuantLinear

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1,
         "q4_k": T.Q4_K, "mxfp4": T.MXFP4}
BLOCK = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q4_k": 256, "mxfp4": 32}

pytestmark = pytest.mark.usefixtures("one_thread")


def gguf_round_trip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The weight as llama.cpp would serve it: the flattened tensor, zero-padded to whole blocks,
    quantized by gguf.quants (q4_k, which gguf cannot quantize: qru's bytes) and dequantized by gguf."""
    flat = w.detach().float().reshape(-1).numpy()
    b = BLOCK[fmt]
    padded = np.concatenate([flat, np.zeros(-flat.size % b, np.float32)]).reshape(-1, b)
    if fmt == "q4_k":
        data = Q.quantize(torch.from_numpy(padded), fmt).data.numpy().reshape(padded.shape[0], -1)
    else:
        data = gguf.quants.quantize(padded, TYPES[fmt])
    out = gguf.quants.dequantize(data, TYPES[fmt]).reshape(-1)[: flat.size]
    return torch.from_numpy(out.copy()).reshape(w.shape)


def hand_built(model: nn.Module, fmt: str, skip=("lm_head",)) -> nn.Module:
    ref = copy.deepcopy(model)
    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip):
            with torch.no_grad():
                m.weight.copy_(gguf_round_trip(m.weight, fmt))
    return ref


def test_precision_lists_agree_with_qru_quant():
    assert P.GGUF_PRECISIONS == Q.GGUF_FORMATS == presets.GGUF_FORMATS
    assert set(presets.GGUF_FOUR_BIT) <= set(Q.GGUF_FORMATS)


@pytest.mark.parametrize("fmt", Q.GGUF_FORMATS)
def test_quantize_model_equals_hand_built(tiny_dir, fmt):
    model = Llama.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    qm = Q.quantize_model(copy.deepcopy(model), fmt).eval()
    kinds = {type(m).__name__ for n, m in qm.named_modules() if n.endswith("_proj")}
    assert kinds == {"QuantLinear"} and isinstance(qm.lm_head, nn.Linear)
    assert all(m.fmt == fmt and m.block_size == BLOCK[fmt] for m in qm.modules() if isinstance(m, QuantLinear))
    ref = hand_built(model, fmt).eval()
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = qm(ids), ref(ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(a, model(ids), atol=1e-5)  # quantization did change the model


def test_quantize_model_rejects_another_block(tiny_dir):
    model = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="block is fixed at 32"):
        Q.quantize_model(model, "q4_0", 64)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # untouched


def test_eval_at_gguf_precisions_matches_hand_built(tiny_dir, shared_data):
    """build_model ignores the block size for fixed-block formats; MUSE scores at q4_0 / q4_k
    equal those of the hand-built dequantized model."""
    tok = Tokenizer.from_dir(tiny_dir)
    ids = torch.randint(3, 200, (1, 11), generator=torch.Generator().manual_seed(1))
    seen = {}

    def fn(model, precision):
        with torch.no_grad():
            seen[precision] = model(ids)
        return muse.evaluate_muse(model, tok, shared_data / "muse-news", limit=2, metrics=["knowmem_f", "privleak"],
                                  max_len=64, knowmem_max_new_tokens=6)

    recs = P.eval_at_precisions(tiny_dir, None, "q4_0,q4_k", fn, block_size=64)
    assert [r["precision"] for r in recs] == ["q4_0", "q4_k"]
    base = Llama.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    for rec in recs:
        ref = hand_built(base, rec["precision"]).eval()
        with torch.no_grad():
            torch.testing.assert_close(seen[rec["precision"]], ref(ids), rtol=1e-5, atol=1e-5)
        want = muse.evaluate_muse(ref, tok, shared_data / "muse-news", limit=2, metrics=["knowmem_f", "privleak"],
                                  max_len=64, knowmem_max_new_tokens=6)
        assert rec["knowmem_f"] == pytest.approx(want["knowmem_f"])
        assert rec["auc"] == pytest.approx(want["auc"])


def test_cli_eval_precision_q4_0(tiny_dir, shared_data, tmp_path):
    from qru.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_dir), "--benchmark", "muse", "--data", str(shared_data / "muse-news"),
                 "--limit", "1", "--max-len", "64", "--precision", "q4_0,mxfp4", "--retrain-auc", "0.5",
                 "--out", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["precision"] for r in recs] == ["q4_0", "mxfp4"]
    assert all(0 <= r["auc"] <= 1 for r in recs)


def test_demo_accepts_gguf_eval_precisions():
    cfg = presets.get_preset("quick", {"eval.precisions": "bf16,q4_0,q4_k,mxfp4", "eval.table_format": "q4_k",
                                       "survival_formats": "q4_0,mxfp4"})
    presets.validate(cfg)
    assert cfg.eval.precisions == ("bf16", "q4_0", "q4_k", "mxfp4")
    with pytest.raises(presets.PresetError, match="eval.precisions"):
        presets.validate(presets.get_preset("quick", {"eval.precisions": "bf16,q3_k"}))

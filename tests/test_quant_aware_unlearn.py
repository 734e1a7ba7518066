"""qru unlearn --quant-aware / --saliency-mask end to end on a tiny model: both modes run and their
outputs load and quantize like a plain run's; the logged forget_nll_q and code_flip_frac against
recomputation from the files (quantize_model, the export path); seeded random format choice resumes
bit-identically; every option error before any work; and the headline (slow): on a model whose
weights sit on the nf4 grid, plain NPO's forgetting is rounded away at nf4 while --quant-aware nf4
keeps at nf4 what plain unlearning reaches only at full precision.
"""
import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qru.eval.precision import build_model
from qru.model.llama import Llama
from qru.model.lora import load_adapter, merge_lora
from qru.model.tokenizer import load_tokenizer
from qru.quant import dequantize, quantize
from qru.quant.qlinear import QuantLinear, quantize_model, split_linears
from qru.train import quant_aware as qa
from qru.train.config import TrainConfigError, UnlearnConfig
from qru.train.data import fixed_sample, load_sets
from qru.train.loop import eval_nll
from qru.train.state import work_dir
from qru.train.unlearn import unlearn

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("qa_data")
    retain = d / "retain.jsonl"
    lines = (shared_data / "tofu" / "retain90.json").read_text(encoding="utf-8").splitlines()[:40]
    retain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"forget": shared_data / "tofu" / "forget01.json", "retain": retain, "cache": d / "cache"}


def _cfg(model, data, out, **kw):
    base = dict(out=str(out), model=str(model), forget=[str(data["forget"])], retain=[str(data["retain"])],
                epochs=1, batch_size=8, max_len=128, precision="fp32", eval_samples=8, progress=False,
                cache_dir=str(data["cache"]), lr=1e-3)
    base.update(kw)
    return UnlearnConfig(**base)


def _forget_eval(model_dir, data, cfg):
    tok = load_tokenizer(model_dir)
    f = load_sets([str(data["forget"])], tok, role="forget", max_len=cfg.max_len, fmt="auto", qa_loss="answer",
                  cache_dir=str(data["cache"]))
    return f.subset(fixed_sample(len(f), cfg.eval_samples, cfg.seed)), tok.pad_id


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_both_modes_end_to_end_and_outputs_are_plain(tiny_dir, data, tmp_path, mode):
    cfg = _cfg(tiny_dir, data, tmp_path / mode, mode=mode, quant_aware="nf4,int8", qa_sample="random",
               **({"train": "linears"} if mode == "full" else {"rank": 4}))
    res = unlearn(cfg)
    assert res.status == "done" and res.out.is_dir()
    run = json.loads((res.out / "run.json").read_text())
    assert run["config"]["quant_aware"] == ["nf4", "int8"] and run["config"]["qa_weight"] == 1.0
    assert run["quant_aware"] == {"formats": ["nf4", "int8"], "weight": 1.0, "sample": "random",
                                  "block_sizes": {"nf4": 64, "int8": None}, "skip": ["lm_head"], "targets": 14}
    evals = [r for r in res.metrics if "forget_nll" in r]
    assert len(evals) == 2 and all(set(r["forget_nll_q"]) == set(r["code_flip_frac"]) == {"nf4", "int8"}
                                   for r in evals)
    assert evals[0]["code_flip_frac"] == {"nf4": 0.0, "int8": 0.0} and evals[-1]["code_flip_frac"]["int8"] > 0
    assert all(r["loss_q"] is not None for r in res.metrics if r["step"] > 0)
    # the returned model is plain again
    assert not any("Parametrized" in type(m).__name__ for m in res.model.modules())

    # oracle: the output files, loaded and quantized by the export path (quantize_model)
    ev, pad = _forget_eval(tiny_dir, data, cfg)
    if mode == "full":
        sd = load_file(str(res.out / "model.safetensors"))
        assert set(sd) == set(load_file(str(tiny_dir / "model.safetensors")))  # plain keys, no parametrizations
        unlearned = Llama.from_pretrained(res.out)
    else:
        unlearned = Llama.from_pretrained(tiny_dir)
        load_adapter(unlearned, res.out)
        merged = Llama.from_pretrained(tiny_dir)
        merged.load_state_dict(merge_lora(unlearned))
        unlearned = merged
    base = Llama.from_pretrained(tiny_dir)
    flips = qa.code_flip_frac(qa.snapshot(base), unlearned, ["nf4", "int8"])
    for fmt in ("nf4", "int8"):
        assert evals[-1]["code_flip_frac"][fmt] == pytest.approx(flips[fmt], abs=2e-4), fmt  # LoRA: merge rounding
        q0 = quantize_model(copy.deepcopy(base), fmt)
        q1 = quantize_model(copy.deepcopy(unlearned), fmt)
        assert sum(isinstance(m, QuantLinear) for m in q1.modules()) == 14  # quantizes like a plain checkpoint
        assert evals[0]["forget_nll_q"][fmt] == pytest.approx(eval_nll(q0, ev, 16, pad, CPU, "fp32"), rel=1e-5)
        assert evals[-1]["forget_nll_q"][fmt] == pytest.approx(eval_nll(q1, ev, 16, pad, CPU, "fp32"), rel=1e-4)


@pytest.mark.slow
def test_random_formats_are_seeded_and_resume_bit_identically(tiny_dir, data, tmp_path):
    kw = dict(mode="full", train="linears", quant_aware=["nf4", "int4_sym", "q8_0"], qa_sample="random", epochs=2,
              qa_block_size=None, eval_samples=4)
    full = unlearn(_cfg(tiny_dir, data, tmp_path / "a", **kw))
    stopped = unlearn(_cfg(tiny_dir, data, tmp_path / "b", stop_after=3, **kw))
    assert stopped.status == "stopped"
    ck = load_file(str(work_dir(tmp_path / "b") / "checkpoint-3" / "trainable.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight" in ck  # checkpoints hold plain names
    resumed = unlearn(_cfg(tiny_dir, data, tmp_path / "b", resume=True, **kw))
    a, b = load_file(str(full.out / "model.safetensors")), load_file(str(resumed.out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss_q"] for r in full.metrics] == [r["loss_q"] for r in resumed.metrics]
    # another seed draws other formats: the quantized loss differs from the first step on
    other = unlearn(_cfg(tiny_dir, data, tmp_path / "c", seed=1, **kw))
    assert [r["loss_q"] for r in other.metrics[1:4]] != [r["loss_q"] for r in full.metrics[1:4]]


def test_saliency_mask_trains_only_the_top_modules(tiny_dir, data, tmp_path):
    res = unlearn(_cfg(tiny_dir, data, tmp_path / "s", mode="full", saliency_mask=3, method="ga", reg="gdr"))
    run = json.loads((res.out / "run.json").read_text())
    sal = run["saliency"]
    norms = sal["grad_norms"]
    assert sal["topk"] == 3 and len(sal["modules"]) == 3
    assert sorted(norms.values(), reverse=True)[:3] == [norms[m] for m in sal["modules"]]
    assert "model.embed_tokens" in norms and "model.norm" in norms  # train=all: every module is a candidate
    chosen = sorted(f"{m}.weight" for m in sal["modules"])
    assert run["trained_tensors"] == chosen
    before, after = load_file(str(tiny_dir / "model.safetensors")), load_file(str(res.out / "model.safetensors"))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == chosen


@pytest.mark.parametrize("kw, msg", [
    (dict(quant_aware="nf4,int3"), "unknown format 'int3'"),
    (dict(quant_aware="nf4", qa_weight=-1.0), "qa_weight must be a finite number >= 0"),
    (dict(quant_aware="nf4", qa_sample="all"), "qa_sample must be one of"),
    (dict(qa_weight=2.0), "qa_weight must be 1.0 without quant_aware"),
    (dict(quant_aware="q4_0", qa_block_size=64), "qa_block_size: block size 64 does not fit q4_0"),
    (dict(quant_aware="nf4", gradient_checkpointing=True), "gradient_checkpointing must be False with quant_aware"),
    (dict(quant_aware="nf4", qa_skip="layers,lm_head"), "no linear to quantize"),
    (dict(quant_aware="nf4", qa_margin=-0.1), "qa_margin must be None or a finite number of nats >= 0"),
    (dict(qa_margin=0.1), "qa_margin must be None without quant_aware"),
    (dict(quant_aware="nf4", qa_margin=0.1, qa_margin_weight=0.0), "qa_margin_weight must be a finite number > 0"),
    (dict(quant_aware="nf4", qa_margin_weight=2.0), "qa_margin_weight must be 1.0 without qa_margin"),
    (dict(quant_aware="nf4", qa_margin=0.1, qa_margin_grad="sam"), "qa_margin_grad must be one of"),
    (dict(quant_aware="nf4", qa_margin_grad="exact"), "qa_margin_grad must be 'ste' without qa_margin"),
    (dict(saliency_mask=3, mode="lora"), "saliency_mask must be None in LoRA mode"),
    (dict(saliency_mask=15, mode="full", train="linears"), "at most the number of trainable modules \\(14"),
])
def test_bad_options_fail_before_any_work(tiny_dir, data, tmp_path, kw, msg):
    out = tmp_path / "o"
    with pytest.raises(TrainConfigError, match=msg):
        unlearn(_cfg(tiny_dir, data, out, **kw))
    assert not out.exists() and not work_dir(out).exists()


@pytest.mark.slow
def test_cli_quant_aware(tiny_dir, data, tmp_path):
    def qru(*args):
        return subprocess.run([sys.executable, "-m", "qru", "unlearn", "--model", str(tiny_dir), "--forget",
                               str(data["forget"]), "--retain", str(data["retain"]), "--epochs", "1", "--batch-size",
                               "8", "--max-len", "128", "--precision", "fp32", "--eval-samples", "4", "--no-progress",
                               "--cache-dir", str(data["cache"]), *args], capture_output=True, text=True)
    r = qru("--mode", "lora", "--quant-aware", "int4", "--qa-weight", "0.5", "--qa-block-size", "32", "--qa-skip",
            "down_proj,lm_head", "--qa-margin", "0.05", "--qa-margin-weight", "3", "--qa-margin-grad", "exact",
            "--out", str(tmp_path / "ok"))
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "ok" / "run.json").read_text())
    assert run["quant_aware"]["block_sizes"] == {"int4": 32} and run["quant_aware"]["targets"] == 12
    assert run["config"]["qa_weight"] == 0.5 and run["config"]["qa_skip"] == ["down_proj", "lm_head"]
    assert run["quant_aware"]["margin"] == {"nats": 0.05, "weight": 3.0, "grad": "exact"}
    rows = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(x["qa_gap"], float) and x["qa_margin"] >= 0 for x in rows if x["step"] > 0)
    r = qru("--mode", "full", "--quant-aware", "nf4", "--qa-weight", "-1", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "qa_weight must be a finite number >= 0" in r.stderr


# -- the headline ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grid_target(data, tmp_path_factory):
    """A tiny Llama fitted to forget + retain, then its export-quantized linears replaced by their nf4
    dequantization: every weight sits on its nf4 code, so an update smaller than half a code step
    rounds back to the same model at nf4."""
    from qru.train.config import PretrainConfig
    from qru.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("grid")
    res = pretrain(PretrainConfig(out=str(root / "target"), data=[str(data["forget"]), str(data["retain"])],
                                  config="tiny", train_tokenizer=512, epochs=8, lr=1e-2, batch_size=8, warmup_steps=5,
                                  max_len=128, precision="fp32", eval_samples=8, progress=False,
                                  cache_dir=str(data["cache"])))
    m = Llama.from_pretrained(res.out)
    with torch.no_grad():
        for _, lin in split_linears(m, ("lm_head",))[0]:
            lin.weight.copy_(dequantize(quantize(lin.weight, "nf4")))
            assert torch.equal(dequantize(quantize(lin.weight, "nf4")), lin.weight)  # on the grid: idempotent
    m.save_pretrained(root / "grid")
    load_tokenizer(res.out).save_pretrained(root / "grid")
    return root / "grid"


def _nll_fp_nf4(model_dir, data, cfg):
    """Forget NLL (the eval subset) of the output at fp32 and after `quantize_model(..., "nf4")`."""
    ev, pad = _forget_eval(model_dir, data, cfg)
    m = Llama.from_pretrained(model_dir)
    fp = eval_nll(m, ev, 16, pad, CPU, "fp32")
    return fp, eval_nll(quantize_model(m, "nf4"), ev, 16, pad, CPU, "fp32")


GRID_NPO = dict(mode="full", train="linears", method="npo", beta=1.0, reg="none", lr=1e-4, epochs=40)


@pytest.fixture(scope="module")
def plain_grid_run(grid_target, data, tmp_path_factory):
    """Plain NPO on the grid target (no quant-aware term): the output directory."""
    return unlearn(_cfg(grid_target, data, tmp_path_factory.mktemp("plain") / "out", **GRID_NPO)).out


@pytest.mark.slow
def test_quant_aware_keeps_at_nf4_what_plain_unlearning_loses(grid_target, plain_grid_run, data, tmp_path):
    """NPO (beta 1, no regulariser), full fine-tuning of the linears, lr 1e-4, 40 epochs. Plain: the
    update is too small to move codes, so at nf4 the model is (nearly) the target again. With
    --quant-aware nf4 (λ = 10) the quantized term keeps pushing after the full-precision term has
    saturated, until codes move: its nf4 forget NLL reaches at least the plain run's fp32 one.
    Measured when written: target 2.574 (fp32 = nf4); plain fp32 2.705, nf4 2.583; quant-aware fp32
    2.913, nf4 2.748. The issue's stricter reading, quant-aware nf4 >= its own full-precision NLL,
    does not hold with plain STE (the latent weights run ahead of their rounding); it needs
    --qa-margin (test_quant_aware_margin_meets_the_strict_criterion, docs/quant_aware.md)."""
    qat = unlearn(_cfg(grid_target, data, tmp_path / "qat", quant_aware=["nf4"], qa_weight=10.0, **GRID_NPO))
    cfg = _cfg(grid_target, data, tmp_path / "x")
    base_fp, base_q = _nll_fp_nf4(grid_target, data, cfg)
    assert base_fp == pytest.approx(base_q, abs=1e-6)
    p_fp, p_q = _nll_fp_nf4(plain_grid_run, data, cfg)
    q_fp, q_q = _nll_fp_nf4(qat.out, data, cfg)
    # plain unlearning forgets at fp32, and nf4 rounds at least 80% of it away
    assert p_fp - base_fp > 0.05
    assert p_q < p_fp and (p_fp - p_q) >= 0.8 * (p_fp - base_fp), (base_fp, p_fp, p_q)
    # quant-aware keeps it at nf4: at least the forgetting plain unlearning had before quantization
    assert q_q >= p_fp, (base_fp, p_fp, p_q, q_fp, q_q)
    # the run's own monitoring agrees with the export path at the end
    last = [r for r in qat.metrics if "forget_nll" in r][-1]
    assert last["forget_nll_q"]["nf4"] == pytest.approx(q_q, rel=1e-4)
    assert last["code_flip_frac"]["nf4"] > 0


def _forget_nll_at(model_dir, data, cfg, precision):
    """Forget NLL over the whole forget set of the output built at ``precision`` the way ``qru eval``
    builds it (qru.eval.precision.build_model: bf16 casts weights and compute, nf4 is quantize_model)."""
    tok = load_tokenizer(model_dir)
    f = load_sets([str(data["forget"])], tok, role="forget", max_len=cfg.max_len, fmt="auto", qa_loss="answer",
                  cache_dir=str(data["cache"]))
    return eval_nll(build_model(model_dir, precision), f, 16, tok.pad_id, CPU, "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("grad", ["ste", "exact"])
def test_quant_aware_margin_meets_the_strict_criterion(grid_target, plain_grid_run, data, tmp_path, grad):
    """Issue 20's strict reading: with --quant-aware nf4 --qa-margin 0.1 --qa-margin-weight 30 (λ 10,
    80 epochs, either margin gradient) the output's forget NLL at nf4 is no lower than at bf16, for
    two seeds, on the fixture where plain NPO loses >= 80% of its forgetting at nf4. The oracle is the
    quantize-then-evaluate path (build_model, as qru eval), not the training's fake quantization.
    Measured when written (whole forget set, bf16 / nf4; docs/quant_aware.md): target 2.574 / 2.574,
    plain 2.705 / 2.583; ste: seed 0 3.046 / 3.106, seed 1 3.066 / 3.138; exact: seed 0 2.608 /
    2.635, seed 1 2.607 / 2.635."""
    cfg = _cfg(grid_target, data, tmp_path / "x")
    base = _forget_nll_at(grid_target, data, cfg, "bf16"), _forget_nll_at(grid_target, data, cfg, "nf4")
    p_bf16, p_nf4 = _forget_nll_at(plain_grid_run, data, cfg, "bf16"), _forget_nll_at(plain_grid_run, data, cfg, "nf4")
    # the fixture's premise, by the same oracle: plain forgets at bf16 and nf4 rounds >= 80% of it away
    assert p_bf16 - base[1] > 0.05
    assert p_bf16 - p_nf4 >= 0.8 * (p_bf16 - base[1]), (base, p_bf16, p_nf4)
    for seed in (0, 1):
        run = unlearn(_cfg(grid_target, data, tmp_path / f"m{seed}", quant_aware=["nf4"], qa_weight=10.0,
                           qa_margin=0.1, qa_margin_weight=30.0, qa_margin_grad=grad, seed=seed,
                           **{**GRID_NPO, "epochs": 80}))
        info = json.loads((run.out / "run.json").read_text())["quant_aware"]
        assert info["margin"] == {"nats": 0.1, "weight": 30.0, "grad": grad}
        assert all(r["qa_margin"] is not None and r["qa_gap"] is not None for r in run.metrics if r["step"] > 0)
        bf16, nf4 = _forget_nll_at(run.out, data, cfg, "bf16"), _forget_nll_at(run.out, data, cfg, "nf4")
        assert nf4 >= bf16, (seed, bf16, nf4)
        # and it does forget at nf4: well beyond what plain unlearning keeps there (not a trivial no-op)
        assert nf4 - base[1] >= max(0.03, 2 * (p_nf4 - base[1])), (seed, base, p_nf4, nf4)

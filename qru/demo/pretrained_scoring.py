"""Scoring of the ``pretrained`` preset (:mod:`qru.demo.pretrained`): greedy exact match, KnowMem F1 and
answer NLL of short QA answers, models viewed at each evaluation precision, the stopping rules and the
survival diagnostics.

Speed without changing what is measured:

* **One teacher-forced pass decides most answers.** Every QA record is tokenized as prompt + answer +
  eos (the training format). One forward pass over all records gives the answer NLL and, at each answer
  position, the greedy (argmax) token. Where the argmax equals the answer token at every answer position
  and at the eos, and the answer fits in ``max_new_tokens``, greedy decoding from the prompt produces
  exactly the answer and stops: exact match 1, F1 100, without generating. Only the other records are
  generated (batched, greedy, cut at the first newline). The two routes agree up to floating-point
  round-off between a full forward pass and cached decoding (tested against generation).
* **Fake-quantized weights.** A quantized model is evaluated with every linear but ``lm_head`` replaced
  by ``dequantize(quantize(W))`` (:func:`qru.kernels.fake_quant.fake_quant_values`, bit-equal to
  ``qru.quant``'s round trip, with the block sizes ``qru.eval.precision.build_model`` uses) and fp32
  compute: the values the quantized layers compute with, without loading the model once per precision.
* **bf16 compute.** The matmuls run under bf16 autocast (fp32 accumulation; the answer log-probs in fp32),
  as a bf16 model runs, and as bitsandbytes' 4-bit layers run with ``bnb_4bit_compute_dtype=bfloat16``
  (their weights are dequantized to bf16 too). About twice as fast as fp32 compute on an AMX CPU.
"""
from __future__ import annotations

import contextlib
import statistics

import torch

from qru.eval.common import rouge_l
from qru.eval.generation import generate_batched
from qru.kernels.fake_quant import fake_quant_values
from qru.model.generate import decode_new
from qru.quant.qlinear import resolve_block_size, split_linears
from qru.data import qa_prompt
from qru.train.data import collate, load_sets

QUANT_BLOCK = 64  # qru.eval.precision.build_model's block_size (nf4/fp4 block, int4 group; int8 per row)
SCORER_VERSION = "em-tf-f1-nll-bf16c-v2"  # part of every stage key whose result depends on the scorer


def normalize(text: str) -> str:
    """The first line, stripped, lower-cased, without final punctuation (the exact-match form)."""
    return text.strip().split("\n")[0].strip().rstrip(".!,;:").strip().lower()


class QAScorer:
    """Greedy answers (exact match, KnowMem F1) and answer NLL of QA records, at whatever precision the
    given model's weights have (module docstring: one teacher-forced pass, generation only where needed).
    ``bf16_compute``: matmuls under bf16 autocast (the head's log-softmax of the target rows stays fp32)."""

    def __init__(self, tok, sets: dict[str, list[dict]], files: dict, max_new_tokens: int, cache_dir: str | None,
                 bf16_compute: bool = True):
        self.tok, self.sets, self.max_new, self.bf16_compute = tok, sets, max_new_tokens, bf16_compute
        self.tokens = {g: load_sets([str(files[g])], tok, 128, "qa", "answer", cache_dir, role=g) for g in sets}
        self.shortcut = {}  # group -> per record: the teacher-forced pass can decide it
        self.decoded = {}  # group -> per record: the answer as greedy decoding would return it
        for g, recs in sets.items():
            ok, self.decoded[g] = [], []
            for i, r in enumerate(recs):
                ids, mask = (list(map(int, x)) for x in self.tokens[g].example(i))
                prompt = tok.encode(qa_prompt(r["question"]), bos=True)
                first = next((j for j, m in enumerate(mask) if m), len(mask))
                n_answer = sum(mask) - 1  # the answer tokens; the last target is eos
                ok.append(ids[:len(prompt)] == prompt and first == len(prompt) and 0 < n_answer <= max_new_tokens)
                self.decoded[g].append(decode_new(tok, ids[first:first + n_answer], None, ["\n"]))
            self.shortcut[g] = ok

    @torch.no_grad()
    def teacher_forced(self, model, group: str) -> tuple[list[float], list[bool]]:
        """Per record: the mean answer NLL (nats per target token, eos included) and whether the argmax
        token equals the target at every target position."""
        ts = self.tokens[group]
        b = collate(ts, list(range(len(ts))), self.tok.pad_id)
        hidden = model(b.input_ids, return_hidden=True)
        mask = b.loss_mask[:, 1:].bool()
        rows, cols = mask.nonzero(as_tuple=True)
        h, y = hidden[:, :-1][rows, cols].float(), b.input_ids[:, 1:][rows, cols]
        with torch.autocast("cpu", enabled=False):  # the head of the target rows in fp32
            logits = h @ model.lm_head.weight.float().T
            lp = logits.log_softmax(-1).gather(1, y[:, None])[:, 0]
        hit = (logits.argmax(-1) == y).float()
        n = len(ts)
        sums = torch.zeros(n).index_add_(0, rows, lp)
        counts = torch.zeros(n).index_add_(0, rows, torch.ones_like(lp))
        misses = torch.zeros(n).index_add_(0, rows, 1.0 - hit)
        return ([float(-s / max(float(c), 1.0)) for s, c in zip(sums, counts)],
                [bool(m == 0) for m in misses])

    @torch.no_grad()
    def __call__(self, model, groups=None) -> dict[str, dict]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_compute):
            return self._score(model, groups)

    def _score(self, model, groups) -> dict[str, dict]:
        was = model.training
        model.eval()
        out = {}
        for g in groups or self.sets:
            recs = self.sets[g]
            nll, tf = self.teacher_forced(model, g)
            decided = [t and s for t, s in zip(tf, self.shortcut[g])]
            todo = [i for i, d in enumerate(decided) if not d]
            gen = generate_batched(model, self.tok, [qa_prompt(recs[i]["question"]) for i in todo], self.max_new,
                                   stop=["\n"], batch_size=48) if todo else []
            preds = list(self.decoded[g])
            for i, p in zip(todo, gen):
                preds[i] = p
            out[g] = {"em": [float(normalize(p) == normalize(r["answer"])) for p, r in zip(preds, recs)],
                      "f1": [100.0 * rouge_l(r["answer"], p.strip().split("\n")[0])[0] for p, r in zip(preds, recs)],
                      "nll": nll, "outputs": preds, "generated": len(todo)}
        model.train(was)
        return out


def summary(scored: dict[str, dict]) -> dict[str, float]:
    """``{group}_acc``, ``{group}_f1`` and ``{group}_nll`` means of a :class:`QAScorer` result."""
    out = {}
    for g, r in scored.items():
        out[f"{g}_acc"] = statistics.fmean(r["em"])
        out[f"{g}_f1"] = statistics.fmean(r["f1"])
        out[f"{g}_nll"] = statistics.fmean(r["nll"])
    return out


def quantized_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The linears in-memory quantization replaces: every plain ``nn.Linear`` but ``lm_head``."""
    return split_linears(model, ("lm_head",))[0]


@contextlib.contextmanager
def precision_view(model, precision: str, quantized: dict | None = None):
    """``model`` (fp32 weights) with the weights it has at ``precision``; restored after.

    ``bf16``: every floating parameter rounded to bf16 (a no-op for a bf16 model). A quantized format:
    every linear but ``lm_head`` replaced by ``dequantize(quantize(W))`` with ``build_model``'s block size;
    ``quantized`` (optional) receives ``{weight name: fake-quantized tensor}``."""
    saved = {}
    with torch.no_grad():
        if precision == "bf16":
            for n, p in model.named_parameters():
                if p.is_floating_point() and p.dtype != torch.bfloat16:
                    saved[n] = p.detach().clone()
                    p.copy_(p.to(torch.bfloat16).to(p.dtype))
        elif precision != "fp32":
            bs = resolve_block_size(precision, QUANT_BLOCK)
            for name, m in quantized_linears(model):
                w = m.weight
                saved[f"{name}.weight"] = w.detach().clone()
                q = fake_quant_values(w.detach().float(), precision, bs, name=f"{name}.weight")
                if quantized is not None:
                    quantized[f"{name}.weight"] = q
                w.copy_(q.to(w.dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, v in saved.items():
                params[n].copy_(v)


def target_rule(scorer: QAScorer, acc: float):
    """Stop the target's fine-tuning once its bf16 accuracy on forget + retain reaches ``acc``."""

    def check(model) -> dict:
        with precision_view(model, "bf16"):
            s = summary(scorer(model, ("forget", "retain")))
        both = (s["forget_acc"] + s["retain_acc"]) / 2
        return {"forget_acc": s["forget_acc"], "retain_acc": s["retain_acc"], "stop": both >= acc}

    return check


def unlearn_rule(scorer: QAScorer, target_forget_acc: float, forget_ratio: float, retain_floor: float):
    """The stopping rule of every unlearning run (:mod:`qru.demo.pretrained`), at bf16."""

    def check(model) -> dict:
        with precision_view(model, "bf16"):
            s = summary(scorer(model, ("forget", "retain")))
        forgot = s["forget_acc"] <= forget_ratio * target_forget_acc
        fell = s["retain_acc"] < retain_floor
        outcome = "retain fell" if fell else "forgot" if forgot else None
        return {"forget_acc": s["forget_acc"], "retain_acc": s["retain_acc"], "stop": outcome is not None,
                "outcome": outcome}

    return check


class TargetWeights:
    """The target's quantized linears, fp32, and their fake-quantized values per format (computed once)."""

    def __init__(self, target_model):
        self.w = {f"{n}.weight": m.weight.detach().float().clone() for n, m in quantized_linears(target_model)}
        self._q: dict[str, dict] = {}

    def quantized(self, fmt: str) -> dict[str, torch.Tensor]:
        if fmt not in self._q:
            bs = resolve_block_size(fmt, QUANT_BLOCK)
            self._q[fmt] = {n: fake_quant_values(w, fmt, bs, name=n) for n, w in self.w.items()}
        return self._q[fmt]


def diagnostics(target: TargetWeights, model_w: dict[str, torch.Tensor], quantized: dict[str, torch.Tensor],
                fmt: str) -> dict:
    """Survival diagnostics of an unlearned model against the target at one format, over the linears
    in-memory quantization replaces: ``changed_share`` (weights that differ from the target's at all),
    ``in_bin_share`` (of the changed weights, those whose quantized value equals the target's),
    ``value_flip_share`` (weights whose quantized value differs from the target's), and
    :mod:`qru.quant.survival`'s ``projection`` = Σ⟨D, ΔW⟩ / Σ‖ΔW‖² (D = Q(W') − Q(W)) and
    ``delta_rel_norm`` = ‖ΔW‖ / ‖W‖."""
    tq = target.quantized(fmt)
    changed = inbin = flips = total = 0
    qd = d2 = w2 = 0.0
    for n, w in target.w.items():
        d = model_w[n].float() - w
        dq = quantized[n].float() - tq[n]
        ch = d != 0
        same = dq == 0
        changed += int(ch.sum())
        inbin += int((ch & same).sum())
        flips += int((~same).sum())
        total += w.numel()
        qd += float((dq * d).sum())
        d2 += float((d * d).sum())
        w2 += float((w * w).sum())
    return {"changed_share": changed / total, "in_bin_share": inbin / changed if changed else None,
            "value_flip_share": flips / total, "projection": qd / d2 if d2 > 0 else None,
            "delta_rel_norm": (d2 / w2) ** 0.5 if w2 > 0 else None}

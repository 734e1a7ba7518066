"""Batched evaluation's fast paths against one-at-a-time oracles: generation that drops
finished rows or starts from a prefilled cache, scoring that shares a prompt between rows,
fp32 linears through oneDNN with packed weights (the linear dispatch), attention to a shared
prefix held once; and that evaluation replaces no module's forward."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval_helpers import left_pad_rows
from qru.eval import muse, tofu
from qru.kernels import linear as KL
from qru.kernels import prefix_attention as PA
from qru.eval.common import score_ids
from qru.model.config import LlamaConfig
from qru.model.generate import generate_ids
from qru.model.llama import KVCache, Llama


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.preset("tiny", vocab_size=97, initializer_range=0.2)).eval()


# -- generation -----------------------------------------------------------------------------

def test_finished_rows_leave_the_batch(model, monkeypatch):
    """Rows stopped at different steps (EOS, a stop callback) are dropped from the cache; the
    others' tokens equal the run that keeps every row and each row generated alone."""
    torch.manual_seed(1)
    rows = [torch.randint(3, 97, (n,)) for n in (9, 4, 7, 6, 8)]
    ids, mask = left_pad_rows(rows)
    free = generate_ids(model, ids, mask, max_new_tokens=12, drop_finished=False)
    W = ids.shape[1]
    eos = int(free[0, W + 2])  # row 0 ends at its third token (other rows may hit it too)
    stop_at = {1: 4, 3: 6}  # rows 1 and 3 stop after 4 and 6 tokens through the callback

    def should_stop(r, new):
        return r in stop_at and len(new) >= stop_at[r]

    reorders = []
    real = KVCache.reorder
    monkeypatch.setattr(KVCache, "reorder", lambda self, idx: reorders.append(len(idx)) or real(self, idx))
    kept = generate_ids(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=-1,
                        should_stop=should_stop, drop_finished=False)
    assert reorders == []
    dropped = generate_ids(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=-1,
                           should_stop=should_stop)
    assert reorders and all(b > a for a, b in zip(reorders[1:], reorders))  # the batch only shrinks
    assert torch.equal(dropped, kept)
    for i, r in enumerate(rows):
        alone = generate_ids(model, r[None], max_new_tokens=12, eos_token_id=eos, pad_token_id=-1,
                             should_stop=lambda _, new, i=i: should_stop(i, new))
        n = alone.shape[1] - len(r)
        assert torch.equal(dropped[i, W:W + n], alone[0, len(r):]), i
        assert (dropped[i, W + n:] == -1).all(), i
    assert (dropped[0, W + 3:] == -1).all() and (dropped[1, W + 4:] == -1).all()


def test_prefilled_cache_continues_the_prompt(model):
    """A cache holding a prefix (copied into every row), then left-padded suffixes: the same
    tokens as generating from the whole prompts."""
    torch.manual_seed(2)
    prefix = torch.randint(3, 97, (11,))
    suffixes = [torch.randint(3, 97, (n,)) for n in (3, 1, 5)]
    ids, smask = left_pad_rows(suffixes)
    B, W, p, new = len(suffixes), ids.shape[1], len(prefix), 9
    cache = model.new_cache(B, p + W + new)
    with torch.no_grad():
        model(prefix[None].repeat(B, 1), cache=cache)
    mask = torch.cat([torch.ones(B, p, dtype=torch.long), smask], dim=1)
    got = generate_ids(model, ids, mask, max_new_tokens=new, cache=cache)
    for i, s in enumerate(suffixes):
        alone = generate_ids(model, torch.cat([prefix, s])[None], max_new_tokens=new)
        assert torch.equal(got[i, W:], alone[0, p + len(s):]), i
    short = model.new_cache(B, p + W + 2)
    short.seen = p
    with pytest.raises(ValueError, match="attention_mask shape"):  # the mask must cover the cached prefix
        generate_ids(model, ids, smask, max_new_tokens=2, cache=short)


def prefill_widths(model, monkeypatch) -> list:
    """The (rows, tokens) shape of every multi-token forward of ``model`` from now on."""
    widths = []
    real = type(model).forward
    monkeypatch.setattr(type(model), "forward",
                        lambda self, x, *a, **k: (widths.append(tuple(x.shape)) if x.shape[1] > 1 else None)
                        or real(self, x, *a, **k))
    return widths


def test_prefill_in_row_groups(model, monkeypatch):
    """A prefill over more tokens than ``prefill_tokens`` runs in groups of rows into one
    cache: same tokens as the single prefill, for a left-padded batch and a prefilled cache."""
    torch.manual_seed(6)
    rows = [torch.randint(3, 97, (n,)) for n in (9, 4, 7, 6, 8)]
    ids, mask = left_pad_rows(rows)
    W = ids.shape[1]
    widths = prefill_widths(model, monkeypatch)
    want = generate_ids(model, ids, mask, max_new_tokens=6, prefill_tokens=None, unpadded_prefill=False)
    for budget, groups in ((W, [1, 1, 1, 1, 1]), (2 * W + 1, [2, 2, 1])):
        widths.clear()
        assert torch.equal(generate_ids(model, ids, mask, max_new_tokens=6, prefill_tokens=budget,
                                        unpadded_prefill=False), want)
        assert widths == [(b, W) for b in groups]
    # on top of a prefilled prefix, positions offset
    prefix = torch.randint(3, 97, (5,))
    cache = model.new_cache(len(rows), 5 + W + 6)
    with torch.no_grad():
        model(prefix[None].repeat(len(rows), 1), cache=cache)
    full = torch.cat([torch.ones(len(rows), 5, dtype=torch.long), mask], 1)
    got = generate_ids(model, ids, full, max_new_tokens=6, cache=cache, prefill_tokens=W)
    for i, r in enumerate(rows):
        alone = generate_ids(model, torch.cat([prefix, r])[None], max_new_tokens=6)
        assert torch.equal(got[i, W:], alone[0, 5 + len(r):]), i


def test_unpadded_prefill(model, monkeypatch):
    """A left-padded batch prefills without its padding: the rows' prompts packed end to end in
    one forward row (each causal within itself), in groups of consecutive rows under a token
    budget (a longer row alone); every row's tokens equal the row generated alone, and no
    forward sees a padded position. Without the model's ``head``: rows of equal length together."""
    torch.manual_seed(8)
    rows = [torch.randint(3, 97, (n,)) for n in (9, 4, 7, 4, 4, 8)]
    ids, mask = left_pad_rows(rows)
    W = ids.shape[1]
    widths = prefill_widths(model, monkeypatch)
    alone = [generate_ids(model, r[None], max_new_tokens=6)[0, len(r):] for r in rows]
    for budget, want_widths in ((None, [(1, 36)]), (8, [(1, 9), (1, 4), (1, 7), (1, 8), (1, 8)]),
                                (20, [(1, 20), (1, 16)])):
        widths.clear()
        got = generate_ids(model, ids, mask, max_new_tokens=6, prefill_tokens=budget)
        assert widths == want_widths
        for i in range(len(rows)):
            assert torch.equal(got[i, W:], alone[i]), (budget, i)
    monkeypatch.setattr(type(model), "head", None)  # no separate lm_head: equal lengths batched
    widths.clear()
    got = generate_ids(model, ids, mask, max_new_tokens=6, prefill_tokens=None)
    assert widths == [(3, 4), (1, 7), (1, 8), (1, 9)]
    for i in range(len(rows)):
        assert torch.equal(got[i, W:], alone[i]), i
    right = torch.zeros_like(mask)
    right[:, :3] = 1
    with pytest.raises(ValueError, match="left padding"):
        generate_ids(model, ids, right, max_new_tokens=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_equals_forward_logits(model, dtype):
    """``Llama.head`` on ``return_hidden`` states gives ``forward``'s logits (bf16: the same
    inference linears), which the unpadded prefill relies on."""
    m = model.to(dtype)
    try:
        ids = torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = m(ids, num_logits=1)
            got = m.head(m(ids, num_logits=1, return_hidden=True))
        assert got.dtype == dtype and torch.equal(got, want)
    finally:
        model.float()


# -- scoring ----------------------------------------------------------------------------------

def _oracle(model, ids, start):
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return lsm[start - 1:-1].gather(-1, torch.tensor(ids[start:])[:, None]).squeeze(-1).double().numpy()


def test_score_shared_prompts_equal_unbatched(model, monkeypatch):
    """Rows sharing a prompt run it once per batch: three prompts of different lengths (so the
    batch cache has gaps), a prompt too short to share, a row alone with its prompt, rows given
    in shuffled order. Every row's log-probs equal its own unbatched forward."""
    from qru.eval import common

    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rand(20), rand(27), rand(17), rand(4), rand(22)]
    rows, starts = [], []
    for k, (p, n) in enumerate(zip(prompts, (4, 3, 2, 3, 1))):
        for _ in range(n):
            rows.append([1] + p + rand(int(torch.randint(1, 12, (1,), generator=g))))
            starts.append(1 + len(p) + (0 if k != 2 else -2))  # group 2 also scores its prompt's tail
    perm = torch.randperm(len(rows), generator=g).tolist()
    rows, starts = [rows[i] for i in perm], [starts[i] for i in perm]
    calls = []
    real = common._prefix_forward

    def spy(m, rs, idx, plen, pad):
        calls.append([plen[i] for i in idx])
        return real(m, rs, idx, plen, pad)

    monkeypatch.setattr(common, "_prefix_forward", spy)
    for batch_size in (3, 16):
        calls.clear()
        got = score_ids(model, rows, starts, batch_size=batch_size, stats=False, min_shared=8)
        shared = sorted(p for c in calls for p in c)
        # groups 0-2 share (4 + 3 + 2 rows); the 4-token prompt and the lone row do not
        assert len(shared) == 9 and set(shared) == {20, 27, 15}
        assert all(len(c) <= batch_size for c in calls)
        for r, s, sc in zip(rows, starts, got):
            np.testing.assert_allclose(sc.logprobs, _oracle(model, r, s), atol=2e-5, rtol=1e-5)
    plain = score_ids(model, rows, starts, batch_size=16, stats=True, share_prefix=False)
    shared = score_ids(model, rows, starts, batch_size=16, stats=True)
    for a, b in zip(plain, shared):
        np.testing.assert_allclose(a.zscores, b.zscores, atol=2e-4, rtol=1e-4)


def test_tofu_scores_with_shared_prompts_equal_one_by_one(model_tok, shared_data, monkeypatch, one_thread):
    from qru.eval import common

    model, tok = model_tok
    calls = []
    real = common._prefix_forward
    monkeypatch.setattr(common, "_prefix_forward", lambda *a: calls.append(1) or real(*a))
    kw = dict(forget_split="forget01", limit=2, max_new_tokens=6, extra_splits=())
    batched = tofu.evaluate_tofu(model, tok, shared_data / "tofu", batch_size=4, score_batch_size=8, **kw)
    assert calls
    calls.clear()
    single = tofu.evaluate_tofu(model, tok, shared_data / "tofu", batch_size=1, score_batch_size=1, **kw)
    assert not calls
    for split in ("forget", "retain"):
        for a, b in zip(batched["items"][split], single["items"][split]):
            assert a["output"] == b["output"]
            assert a["gt_loss"] == pytest.approx(b["gt_loss"], abs=1e-5)
            assert a["perturbed_loss"] == pytest.approx(b["perturbed_loss"], abs=1e-5)
            assert a["truth_ratio"] == pytest.approx(b["truth_ratio"], rel=1e-4)


# -- packed linears ---------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not KL.packing_available(), reason="oneDNN packed linear unavailable")


@needs_onednn
def test_muse_with_packed_linears_equals_plain(model_tok, shared_data, one_thread, monkeypatch):
    """MUSE through the packed oneDNN linears equals MUSE through F.linear (both calibration
    choices overridden), and the packed copies really were used, one by one and with q/k/v and
    gate/up fused (without hooks); no module's forward is replaced at any call during the
    evaluation (checked by a pre-hook on every module, under which the projections run one by one)."""
    monkeypatch.setenv("QRU_PACKED_FP32", "onednn")
    model, tok = model_tok
    kw = dict(limit=2, batch_size=4, score_batch_size=4, max_len=96, verbmem_max_new_tokens=16,
              knowmem_max_new_tokens=12)
    swapped = []
    hooks = [m.register_forward_pre_hook(lambda m, a: swapped.append(m) if "forward" in m.__dict__ else None)
             for m in model.modules()]
    try:
        fast = muse.evaluate_muse(model, tok, shared_data / "muse-news", **kw)
    finally:
        for h in hooks:
            h.remove()
    assert swapped == [] and all("forward" not in m.__dict__ for m in model.modules())
    layer = model.model.layers[0]  # hooked layers run one by one (fused_linears declines)
    assert model.lm_head.packed_weight.packed and layer.mlp.up_proj.packed_weight.packed
    assert not layer.mlp.gate_up_packed.packed
    fused = muse.evaluate_muse(model, tok, shared_data / "muse-news", **kw)  # no hooks: q/k/v, gate/up fused
    assert layer.mlp.gate_up_packed.packed and layer.self_attn.qkv_packed.packed
    assert not layer.mlp.up_proj.packed_weight.packed  # its copy was replaced by the fused one
    monkeypatch.setenv("QRU_PACKED_FP32", "torch")
    monkeypatch.setenv("QRU_DENSE_FP32", "torch")
    plain = muse.evaluate_muse(model, tok, shared_data / "muse-news", **kw)
    monkeypatch.setenv("QRU_PACKED_FP32", "onednn")
    monkeypatch.delenv("QRU_DENSE_FP32")
    for got in (fast, fused):
        for key in ("verbmem_f", "knowmem_f", "knowmem_r"):
            assert [x["output"] for x in got["items"][key]] == [x["output"] for x in plain["items"][key]]
        for side in ("forget", "holdout"):
            for a, b in zip(got["items"]["privleak"][side], plain["items"]["privleak"][side]):
                assert a["Min-40%"] == pytest.approx(b["Min-40%"], abs=1e-4)
                assert a["Min-40%++"] == pytest.approx(b["Min-40%++"], abs=1e-3)
    assert fast["auc"] == plain["auc"]
    single = muse.evaluate_muse(model, tok, shared_data / "muse-news", **{**kw, "batch_size": 1, "score_batch_size": 1})
    for key in ("verbmem_f", "knowmem_f", "knowmem_r"):
        assert [x["output"] for x in fast["items"][key]] == [x["output"] for x in single["items"][key]]



# -- shared-prefix attention ------------------------------------------------------------------

@pytest.mark.parametrize("flash", [True, False])
def test_prefix_attention_equals_attention_over_all_keys(flash, monkeypatch):
    """Prefix (one copy) + per-row keys, merged by log-sum-exp == SDPA over the concatenation,
    for decode (T=1) and left-padded suffix prefill (T>1, causal + padding), GQA 8 -> 2 heads."""
    if not flash:
        monkeypatch.setattr(PA, "_FLASH", None)
        monkeypatch.setattr(PA, "_CHUNK", 500)  # several chunks of rows
    g = torch.Generator().manual_seed(5)
    B, H, KV, D, P = 3, 8, 2, 16, 13
    pk, pv = torch.randn(KV, P, D, generator=g), torch.randn(KV, P, D, generator=g)
    for T, S in ((1, 9), (6, 6), (4, 10)):
        q = torch.randn(B, H, T, D, generator=g)
        k, v = torch.randn(B, KV, S, D, generator=g), torch.randn(B, KV, S, D, generator=g)
        lens = torch.tensor([S, S - 2, 1])  # left padding per row
        pad = torch.arange(S)[None] >= (S - lens)[:, None]
        causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        diag = torch.arange(S)[None, :] == torch.arange(S - T, S)[:, None]  # a padding query sees itself (as Llama)
        mask = (pad[:, None, None, :] & causal[None, None]) | diag[None, None]
        full_k = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2)
        full_v = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2)
        full_m = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), mask.expand(B, 1, T, S)], -1)
        want = F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_m, enable_gqa=True)
        got = PA.prefix_attention(q, pk, pv, k, v, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # no padding, no mask: causal over the rows' own keys (suffix prefill, S == T)
    T = S = 5
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, KV, S, D, generator=g), torch.randn(B, KV, S, D, generator=g)
    full_k = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2)
    full_v = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2)
    full_m = torch.cat([torch.ones(T, P, dtype=torch.bool), torch.ones(T, S, dtype=torch.bool).tril()], -1)
    want = F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_m, enable_gqa=True)
    torch.testing.assert_close(PA.prefix_attention(q, pk, pv, k, v, None), want, atol=1e-5, rtol=1e-5)


def test_shared_prefix_generation_keeps_one_prefix_copy(model_tok, shared_data, monkeypatch):
    """KnowMem-style prompts: the prefix is prefilled once into a one-row cache, the batch
    cache holds only suffixes and new tokens, and the texts equal one-by-one ``generate``
    (rows ending at different steps through the stop strings)."""
    from qru.eval.generation import generate_batched
    from qru.model.generate import generate

    model, tok = model_tok
    icl = json.load(open(shared_data / "muse-news" / "knowmem" / "forget_qa_icl.json"))[:3]
    qa = json.load(open(shared_data / "muse-news" / "knowmem" / "forget_qa.json"))[:6]
    prompts = [muse.knowmem_prompt(d["question"], [(x["question"], x["answer"]) for x in icl]) for d in qa]
    enc = [tok.encode(p, bos=True) for p in prompts]
    from qru.eval.generation import _lcp

    p = _lcp(enc)
    shapes = []
    real = type(model).new_cache
    monkeypatch.setattr(model, "new_cache", lambda b, n, *a: shapes.append((b, n)) or real(model, b, n, *a))
    stop = (" the", "\n")
    got = generate_batched(model, tok, prompts, 20, stop=stop, batch_size=6)
    width = max(len(e) for e in enc) - p
    assert shapes == [(1, p), (6, width + 20)]
    assert got == generate(model, tok, prompts, max_new_tokens=20, stop=stop, batch_size=1)


def test_cpu_token_budget_scales_with_width():
    """4 MiB of the widest fp32 activation per forward, between 256 and 2048 tokens (hand-computed)."""
    from qru.model.config import LlamaConfig
    from qru.model.generate import cpu_token_budget

    assert cpu_token_budget(LlamaConfig.preset("small")) == 1524  # 4194304 // (4 x 688)
    assert cpu_token_budget(LlamaConfig.preset("small", hidden_size=768, intermediate_size=2048)) == 512
    assert cpu_token_budget(LlamaConfig.preset("tiny")) == 2048  # 5957 -> capped
    assert cpu_token_budget(LlamaConfig.preset("llama2-7b")) == 256  # 95 -> the floor

"""Batched evaluation's fast paths against one-at-a-time oracles: generation that drops
finished rows or starts from a prefilled cache."""
import pytest
import torch

from qru.model.config import LlamaConfig
from qru.model.generate import generate_ids
from qru.model.llama import KVCache, Llama


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.preset("tiny", vocab_size=97, initializer_range=0.2)).eval()


def _left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


# -- generation -----------------------------------------------------------------------------

def test_finished_rows_leave_the_batch(model, monkeypatch):
    """Rows stopped at different steps (EOS, a stop callback) are dropped from the cache; the
    others' tokens equal the run that keeps every row and each row generated alone."""
    torch.manual_seed(1)
    rows = [torch.randint(3, 97, (n,)) for n in (9, 4, 7, 6, 8)]
    ids, mask = _left_pad(rows)
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
    ids, smask = _left_pad(suffixes)
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

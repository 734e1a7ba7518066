"""Generation: KV cache == no cache, left-padded batch == one by one, == transformers greedy."""
import pytest
import torch

from qru.model.config import LlamaConfig
from qru.model.generate import cut_at_stop, generate_ids, sample_next
from qru.model.llama import Llama

from eval_helpers import left_pad_rows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.preset("tiny", vocab_size=97, initializer_range=0.2)).eval()


def test_cache_equals_no_cache(model):
    x = torch.randint(3, 97, (3, 9))
    assert torch.equal(generate_ids(model, x, max_new_tokens=14),
                       generate_ids(model, x, max_new_tokens=14, use_cache=False))


def test_cached_logits_equal_full_forward(model):
    x = torch.randint(3, 97, (2, 15))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 15)
        a = model(x[:, :10], cache=cache)
        b = model(x[:, 10:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_one_by_one(model):
    rows = [torch.randint(3, 97, (n,)) for n in (9, 4, 7, 1)]
    ids, mask = left_pad_rows(rows)
    batch = generate_ids(model, ids, mask, max_new_tokens=10)
    for i, r in enumerate(rows):
        alone = generate_ids(model, r[None], max_new_tokens=10)
        assert torch.equal(batch[i, ids.shape[1]:], alone[0, len(r):]), i


def test_matches_transformers_greedy(model, tmp_path):
    from transformers import LlamaForCausalLM

    model.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    rows = [torch.randint(3, 97, (n,)) for n in (8, 5, 8)]
    ids, mask = left_pad_rows(rows)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate_ids(model, ids, mask, max_new_tokens=12), ref)


def test_eos_stops_and_pads(model):
    x = torch.randint(3, 97, (2, 6))
    free = generate_ids(model, x, max_new_tokens=8)
    eos = int(free[0, 6 + 2])  # row 0's third new token becomes the "EOS"
    out = generate_ids(model, x, max_new_tokens=8, eos_token_id=eos, pad_token_id=-1)
    assert torch.equal(out[0, 6:9], free[0, 6:9])
    assert (out[0, 9:] == -1).all()


def test_sampling_seeded_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    # top_p small keeps only the argmax
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, True, 1.0, 0.3, g)) for _ in range(50)}
    assert picks == {1}
    # top_p=0.9 keeps exactly the two top tokens (0.52 + 0.47 mass)
    picks = {int(sample_next(logits, True, 1.0, 0.9, g)) for _ in range(200)}
    assert picks == {1, 2}
    a = sample_next(logits.repeat(8, 1), True, 1.0, 1.0, torch.Generator().manual_seed(3))
    b = sample_next(logits.repeat(8, 1), True, 1.0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_cut_at_stop():
    assert cut_at_stop("Paris\n\nQuestion: x", ["\n\n", "\nQuestion", "Question:"]) == "Paris"
    assert cut_at_stop("no stop", ["\n\n"]) == "no stop"


def test_bad_sampling_args():
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 4), True, 0.0, 1.0, None)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(1, 4), True, 1.0, 1.5, None)


def test_cli_smoke(tmp_path, capsys):
    from qru.cli import main

    assert main(["smoke", "--out", str(tmp_path / "tiny")]) == 0
    assert "identical after reload: True" in capsys.readouterr().out
    assert (tmp_path / "tiny" / "config.json").exists()


def test_left_pad_and_decode_new_by_hand():
    from qru.model.generate import decode_new, left_pad, stop_checker

    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]

    class Tok:  # ids -> letters; pad 0
        pad_id = 0

        @staticmethod
        def decode(ids):
            return "".join(chr(ord("a") + i) for i in ids)

    # padding dropped, cut at EOS (3), then at the first stop string
    assert decode_new(Tok, [0, 1, 2, 3, 4], eos=3, stop=()) == "bc"
    assert decode_new(Tok, [1, 2, 1, 2], eos=None, stop=["cb"]) == "b"  # "bcbc" cut at "cb"
    assert stop_checker(Tok, ()) is None
    check = stop_checker(Tok, ["cb"])
    assert check(0, torch.tensor([1, 2])) is False and check(0, torch.tensor([1, 2, 1])) is True

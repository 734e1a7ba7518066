"""qru.train.losses against hand-computed values on tiny tensors."""
import math

import pytest
import torch

from qru.train import losses as L


def _close(a, b, tol=1e-6):
    a, b = float(torch.as_tensor(a).detach()), float(b)
    assert abs(a - b) < tol, (a, b)


def test_token_logprobs_hand_values():
    # p = [1/6, 2/6, 3/6] from logits log[1, 2, 3]
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 1.0, 2.0]]]))
    labels = torch.tensor([[2, 0]])
    lp = L.token_logprobs(logits, labels)
    assert lp.dtype == torch.float32
    _close(lp[0, 0], math.log(0.5))
    _close(lp[0, 1], math.log(0.25))
    lp = L.token_logprobs(logits, labels, torch.tensor([[1, 0]]))
    _close(lp[0, 1], 0.0)
    # bf16 logits are upcast: result in fp32 and matches the fp32 computation of the bf16 values
    lb = L.token_logprobs(logits.bfloat16(), labels)
    assert lb.dtype == torch.float32
    ref = torch.log_softmax(logits.bfloat16().float(), -1)[0, torch.arange(2), labels[0]]
    torch.testing.assert_close(lb[0], ref)


def test_sequence_logprobs_shift():
    V = 4
    # logits[t] predicts input_ids[t+1]; uniform except row 0 which puts mass 1/2 on token 3
    logits = torch.zeros(1, 3, V)
    logits[0, 0] = torch.log(torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    ids = torch.tensor([[1, 3, 2]])
    s, n = L.sequence_logprobs(logits, ids, torch.tensor([[0, 1, 1]]))
    _close(s[0], math.log(0.5) + math.log(0.25), 1e-5)
    _close(n[0], 2)
    s, n = L.sequence_logprobs(logits, ids, torch.tensor([[1, 0, 1]]))  # position 0 never counts
    _close(s[0], math.log(0.25), 1e-5)
    _close(n[0], 1)


def test_ga_and_gdr():
    s, n = torch.tensor([-2.0, -4.0]), torch.tensor([1.0, 3.0])
    _close(L.gdr(s, n), 1.5)  # (2 + 4) / (1 + 3)
    _close(L.ga(s, n), -1.5)
    _close(L.mean_nll(s, n), 1.5)


def test_npo_at_reference_is_2_over_beta_log2():
    s = torch.tensor([-3.0, -17.5, -0.25])
    _close(L.npo(s, s.clone()), (2 / 0.1) * math.log(2), 1e-5)
    _close(L.npo(s, s.clone(), beta=0.5), 4 * math.log(2), 1e-6)


def test_npo_hand_value_and_gradient():
    # log ratio = 2, beta = 0.5: -(2/0.5) log sigmoid(-1) = 4 log(1 + e)
    s = torch.tensor([-1.0], requires_grad=True)
    out = L.npo(s, torch.tensor([-3.0]), beta=0.5)
    _close(out, 4 * math.log(1 + math.e), 1e-5)
    out.backward()
    # d/dx [-(2/b) log sigmoid(-b x)] = 2 sigmoid(b x)
    _close(s.grad[0], 2 / (1 + math.exp(-1.0)), 1e-6)
    # batch mean of two rows
    v = L.npo(torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -5.0]), beta=0.5)
    _close(v, (4 * math.log(1 + math.e) + 4 * math.log(2)) / 2, 1e-5)


def test_simnpo_hand_value():
    # avg log p = -6/3 = -2; beta 2, delta 0.5: -(2/2) log sigmoid(4 - 0.5) = log(1 + e^-3.5)
    v = L.simnpo(torch.tensor([-6.0]), torch.tensor([3.0]), beta=2.0, delta=0.5)
    _close(v, math.log1p(math.exp(-3.5)), 1e-6)
    # length normalisation: the same mean log-prob gives the same loss at any length
    a = L.simnpo(torch.tensor([-2.0]), torch.tensor([1.0]))
    b = L.simnpo(torch.tensor([-20.0]), torch.tensor([10.0]))
    _close(a, b, 1e-6)


def test_klr_zero_at_reference_and_hand_value():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    mask = torch.ones(2, 5)
    _close(L.klr(logits, logits.clone(), mask), 0.0, 1e-7)
    # ref p = [1/2, 1/2], theta q = [1/4, 3/4]: KL(p||q) = 0.5 log(4/3)
    ref = torch.zeros(1, 2, 2)
    cur = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]))
    v = L.klr(cur, ref, torch.tensor([[1, 0]]))  # second position masked out
    _close(v, 0.5 * math.log(4 / 3), 1e-6)
    # direction: KL(ref||theta), not KL(theta||ref)
    rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert abs(float(v) - rev) > 1e-3


def test_combine():
    _close(L.combine(torch.tensor(2.0), torch.tensor(3.0), gamma=0.5, alpha=2.0), 7.0)
    _close(L.combine(torch.tensor(2.0), None), 2.0)
    with pytest.raises(ValueError, match="both"):
        L.combine(None, None)


@pytest.mark.parametrize("beta", [0, -1.0, float("nan")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        L.npo(torch.zeros(1), torch.zeros(1), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        L.simnpo(torch.zeros(1), torch.ones(1), beta=beta)


def test_empty_masks_raise():
    with pytest.raises(ValueError, match="no target tokens"):
        L.gdr(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="mask is all 0"):
        L.klr(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="count 0"):
        L.simnpo(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="disagree"):
        L.token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))

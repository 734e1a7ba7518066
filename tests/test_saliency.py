"""qru.train.saliency (SURE-style module saliency, Zhang et al. 2024): per-module forget-gradient
norms on a hand-computed fixture, the top-k choice, and freezing the rest (tied tensors kept)."""
import math

import pytest
import torch
from torch import nn

from qru.train import saliency as S


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)            # weight 12 + bias 3
        self.b = nn.Linear(2, 2, bias=False)  # 4
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(5))
        self.c = nn.Linear(2, 2, bias=False)
        self.c.weight.requires_grad_(False)  # frozen: not a candidate


def loss_fn(net):
    # L_k = k (2 Σ a.W + Σ a.b + 10 Σ b.W + Σ norm.w - Σ c.W): the gradient over batches k = 1, 2 is
    # 3·(2, 1, 10, 1) per entry, so ||∇a|| = 3·sqrt(12·4 + 3) = 3·sqrt(51), ||∇b|| = 3·10·2, ||∇norm|| = 3·sqrt(5)
    return lambda k: k * (2 * net.a.weight.sum() + net.a.bias.sum() + 10 * net.b.weight.sum()
                          + net.norm.weight.sum() - net.c.weight.sum())


def test_module_grad_norms_hand_computed():
    net = Net()
    kept = torch.full((3, 4), 7.0)
    net.a.weight.grad = kept
    norms = S.module_grad_norms(net, loss_fn(net), [1.0, 2.0])
    assert list(norms) == ["a", "b", "norm"]
    assert norms["a"] == pytest.approx(3 * math.sqrt(51), rel=1e-6)
    assert norms["b"] == pytest.approx(60.0, rel=1e-6)
    assert norms["norm"] == pytest.approx(3 * math.sqrt(5), rel=1e-6)
    assert net.a.weight.grad is kept and net.b.weight.grad is None  # gradients left as they were
    assert S.top_modules(norms, 2) == ["b", "a"]
    assert S.top_modules({"x": 1.0, "y": 2.0, "z": 1.0}, 3) == ["y", "x", "z"]  # ties: module order


def test_restrict_to_freezes_the_rest():
    net = Net()
    assert S.restrict_to(net, ["b", "norm"]) == ["b.weight", "norm.weight"]
    assert not net.a.weight.requires_grad and not net.a.bias.requires_grad and not net.c.weight.requires_grad
    tied = nn.Module()
    tied.embed = nn.Embedding(5, 3)
    tied.head = nn.Linear(3, 5, bias=False)
    tied.head.weight = tied.embed.weight
    tied.other = nn.Linear(3, 3)
    assert S.restrict_to(tied, ["head"]) == ["embed.weight"]  # the shared tensor, under its first name
    assert tied.head.weight.requires_grad


def test_errors_name_the_option():
    net = Net()
    with pytest.raises(ValueError, match="positive number of modules"):
        S.top_modules({"a": 1.0}, 0)
    with pytest.raises(ValueError, match="--saliency-mask 4: only 3 trainable modules"):
        S.top_modules({"a": 1.0, "b": 1.0, "c": 1.0}, 4)
    with pytest.raises(ValueError, match="no module 'zz'"):
        S.restrict_to(net, ["zz"])
    with pytest.raises(ValueError, match="no forget batch"):
        S.module_grad_norms(net, loss_fn(net), [])

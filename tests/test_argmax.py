"""qru.kernels.argmax: the C++ row argmax (vector and scalar paths) against torch.argmax: ties
(first index), NaN (first NaN), -inf rows, tails shorter than a vector, strided rows."""
import pytest
import torch

from qru.kernels.argmax import argmax, argmax_reference
from cpp_helpers import need_cpp


def _logits(N, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g) * 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 8, 9, 31, 1000, 32000])
@pytest.mark.parametrize("scalar", [False, True])
def test_cpp_matches_torch(dtype, V, scalar):
    ext = need_cpp("llama_ops")
    x = _logits(5, V, dtype, seed=V)
    if V >= 9:
        x[1, 3] = x[1, V - 2] = x[1].max() + 1  # a tie: the first wins
        x[2, :] = float("-inf")  # all -inf: index 0
        x[3, V // 2] = float("nan")  # a NaN wins, as in torch
        x[4, 1] = x[4, V - 1] = float("nan")  # the first NaN
        x[0, V - 1] = x[0].max() + 1  # the max in the tail past the last full vector
    want = x.float().argmax(-1)
    assert torch.equal(want, x.argmax(-1))  # the oracle's widening keeps torch's own answer
    assert torch.equal(ext.argmax_rows(x, scalar), want)
    assert torch.equal(argmax(x), want)


def test_bf16_near_ties_and_shapes():
    """bf16 values that differ in the last bit; leading dims kept; a strided (non-contiguous) view."""
    need_cpp("llama_ops")
    x = torch.zeros(2, 3, 64, dtype=torch.bfloat16)
    x[..., 10] = 1.0
    x[..., 40] = torch.tensor(1.0, dtype=torch.bfloat16).nextafter(torch.tensor(2.0, dtype=torch.bfloat16))
    got = argmax(x)
    assert got.shape == (2, 3) and torch.equal(got, torch.full((2, 3), 40))
    wide = _logits(4, 200, torch.float32)
    assert torch.equal(argmax(wide[:, ::2]), wide[:, ::2].argmax(-1))
    assert torch.equal(argmax(wide.t()), wide.t().argmax(-1))


def test_torch_backend_and_other_dtypes_are_the_reference(monkeypatch):
    x = _logits(3, 50, torch.float16)
    assert torch.equal(argmax(x), argmax_reference(x))
    assert torch.equal(argmax(torch.arange(12).view(3, 4) % 5), (torch.arange(12).view(3, 4) % 5).argmax(-1))
    monkeypatch.setenv("QRU_BACKEND", "torch")
    y = _logits(3, 50, torch.bfloat16)
    assert torch.equal(argmax(y), y.float().argmax(-1))

"""qru.kernels.token_stats on every backend (C++ vector and scalar, Triton interpreted, torch)
against the fp64 oracle; awkward vocabulary sizes, peaked and flat rows, bf16; bad input."""
import math

import pytest
import torch

from qru.kernels.token_stats import token_stats, token_stats_reference
from cpp_helpers import need_cpp, use_backend

BACKENDS = ["torch", "triton", "cpp"]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-5, rtol=2e-5)}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return use_backend(monkeypatch, request.param, "token_stats")


def make(N, V, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(N, V, generator=g)).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    return z, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V", [(1, 1), (3, 5), (7, 17), (4, 100), (5, 2051)])
def test_matches_fp64_oracle(backend, dtype, N, V):
    z, y = make(N, V, dtype=dtype)
    got = token_stats(z, y)
    ref = token_stats_reference(z, y)  # the oracle sees the same (rounded) bf16 logits
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and a.shape == (N,)
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_hand_distribution(backend):
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    z = p.log() + 3.0  # softmax-invariant shift
    y = torch.tensor([1, 2])
    lp, mu, var = token_stats(z, y)
    for t in range(2):
        q = p[t].tolist()
        m = sum(x * math.log(x) for x in q)
        assert lp[t].item() == pytest.approx(math.log(q[int(y[t])]), abs=1e-6)
        assert mu[t].item() == pytest.approx(m, abs=1e-6)
        assert var[t].item() == pytest.approx(sum(x * (math.log(x) - m) ** 2 for x in q), abs=1e-6)


def test_peaked_and_flat_rows(backend):
    """Logits of 1e3 (a one-hot distribution) and a flat row: finite, variance >= 0, oracle's values."""
    z, y = make(4, 300, scale=1.0)
    z[0, 7] = 1000.0
    z[1] = 0.0
    y[0] = 7
    lp, mu, var = token_stats(z, y)
    rl, rm, rv = token_stats_reference(z, y)
    assert torch.isfinite(lp).all() and torch.isfinite(mu).all() and (var >= 0).all()
    torch.testing.assert_close(lp, rl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mu, rm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, rv, atol=1e-5, rtol=1e-5)
    assert var[1].item() == pytest.approx(0.0, abs=1e-6) and lp[1].item() == pytest.approx(-math.log(300), abs=1e-5)


def test_cpp_scalar_path_equals_oracle():
    ext = need_cpp("token_stats")
    for dtype in (torch.float32, torch.bfloat16):
        z, y = make(6, 1000 + 9, dtype=dtype, seed=2)
        for a, b in zip(ext.token_stats(z, y, True), token_stats_reference(z, y)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_strided_rows_and_fp64_input(backend):
    z, y = make(5, 64)
    wide = torch.zeros(5, 80)
    wide[:, :64] = z
    for a, b in zip(token_stats(wide[:, :64], y), token_stats_reference(z, y)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    for a, b in zip(token_stats(z.double(), y), token_stats_reference(z, y)):  # fp64 in: torch ops in fp32
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_bad_input_named():
    z, y = make(3, 10)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        token_stats(z[0], y)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        token_stats(z, torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="floating point"):
        token_stats(z.long(), y)
    with pytest.raises(ValueError, match="empty vocabulary"):
        token_stats(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("V", [1, 50, 4097], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_tile_under_interpreter(V, dtype):
    """The tile the GPU launches with (the whole row up to 4096 columns, then 4096-wide tiles), run
    under the interpreter on awkward widths (one column; a partial tile; one tile plus one column)."""
    from qru.kernels import token_stats as TS
    from qru.kernels._triton_io import gpu_row_block

    g = torch.Generator().manual_seed(V)
    z = (torch.randn(3, V, generator=g) * 4).to(dtype)
    y = torch.randint(0, V, (3,), generator=g)
    assert gpu_row_block(V) == min(4096, 1 << (V - 1).bit_length())
    got = TS._stats_triton(z, y, block_v=gpu_row_block(V))
    for a, b in zip(got, token_stats_reference(z, y)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

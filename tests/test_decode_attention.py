"""qru.kernels.decode_attention: the C++ kernel against the fp32 reference and SDPA, fp32 and bf16."""
import pytest
import torch
import torch.nn.functional as F

from qru.kernels.decode_attention import decode_attention, decode_attention_reference
from cpp_helpers import need_cpp

TOL = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _inputs(B, H, KV, S, D, dtype, smax=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    smax = smax or S
    kc = torch.randn(B, KV, smax, D, generator=g).to(dtype)  # a cache longer than what is seen
    vc = torch.randn(B, KV, smax, D, generator=g).to(dtype)
    mask = torch.rand(B, S, generator=g) > 0.3
    mask[:, -1] = True  # the position itself is always visible
    return q, kc[:, :, :S], vc[:, :, :S], mask[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,KV,S,D", [(1, 1, 1, 1, 8), (3, 4, 2, 17, 12), (2, 8, 8, 130, 64), (2, 6, 3, 33, 5),
                                     (2, 8, 4, 47, 32), (1, 8, 1, 40, 16), (2, 12, 2, 35, 80), (1, 2, 2, 19, 128)])
@pytest.mark.parametrize("masked", [False, True])
def test_cpp_matches_reference_and_sdpa(dtype, B, H, KV, S, D, masked):
    need_cpp("llama_ops")
    q, k, v, mask = _inputs(B, H, KV, S, D, dtype, smax=S + 9)
    mask = mask if masked else None
    with torch.no_grad():
        got = decode_attention(q, k, v, mask)
        ref = decode_attention_reference(q, k, v, mask)
        sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              enable_gqa=H != KV)
    assert got.dtype == dtype and got.shape == (B, H, 1, D)
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(got.float(), sdpa, **TOL[dtype])


def test_torch_backend_is_the_reference(monkeypatch):
    q, k, v, mask = _inputs(2, 4, 2, 9, 8, torch.float32)
    monkeypatch.setenv("QRU_BACKEND", "torch")
    with torch.no_grad():
        assert torch.equal(decode_attention(q, k, v, mask), decode_attention_reference(q, k, v, mask))


def test_bad_shapes_named():
    q = torch.randn(2, 3, 1, 8)
    k = torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match=r"H a multiple of KV"):
        decode_attention(q, k, k, None)


def test_broadcast_mask_batch():
    """A (1, 1, 1, S) mask applies to every batch entry, as in the reference."""
    q, k, v, mask = _inputs(3, 4, 2, 11, 8, torch.float32)
    with torch.no_grad():
        got = decode_attention(q, k, v, mask[:1])
        ref = decode_attention_reference(q, k, v, mask[:1])
    torch.testing.assert_close(got, ref, **TOL[torch.float32])

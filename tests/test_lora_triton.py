"""LoRA's Triton path for the GPU: the dropout mask hashed inside the kernels (bit-equal to the
reference and C++ masks, never stored), every autotune configuration launched explicitly under
the interpreter, and ``@gpu`` tests (LoRA fwd/bwd with NF4 base and dropout, token_stats) that
run the same on CUDA."""
import pytest
import torch

from qru.kernels import hash_dropout as HD
from qru.kernels import lora as K
from qru.kernels import lora_triton as LT
from qru.kernels import token_stats as TS
from qru.kernels._backend import load_cpp_ext
from test_lora_kernels import TOL, make, nf4_of, reference, rel_err

MASK_CASES = [(1, 1, 0, 1), (7, 25, -1, 3277), (33, 40, 2 ** 62 + 12345, 32768), (70, 129, -(2 ** 63), 65535),
              (16, 16, 2 ** 63 - 1, 19661)]


@pytest.mark.parametrize("rows,cols,seed,thr", MASK_CASES)
def test_triton_hash_mask_bit_equal(rows, cols, seed, thr):
    """The Triton hash (the function the kernels call per tile) against the torch-ops oracle and
    the C++ kernel, for the same seed and (row, column) offsets."""
    s = torch.tensor(seed, dtype=torch.int64)
    got = HD.hash_drop_triton(rows, cols, s, thr)
    ref = HD.hash_drop_reference(rows, cols, s, thr)
    assert got.dtype == torch.bool and torch.equal(got, ref)
    ext = load_cpp_ext("lora")
    if ext is not None:
        assert torch.equal(ext.drop_mask(rows, cols, seed, thr), got)


def _triton_fn_node(y):
    node = y.grad_fn
    while type(node).__name__ != "LoRALinearTritonFnBackward":
        node = node.next_functions[0][0]
    return node


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_sampled_dropout_in_kernel(monkeypatch, dtype, nf4):
    """Sampled dropout on the Triton path equals the reference under the mask that
    make_dropout_mask draws for the same generator state (y and all gradients), with no mask
    materialized: neither the torch nor the C++ mask builder runs, and no bool tensor is saved."""
    monkeypatch.setenv("QRU_BACKEND", "triton")
    M, n_in, n_out, r, p = 37, 40, 23, 8, 0.3
    x, W, b, A, B = make(M, n_in, n_out, r, dtype, bias=True)
    base = nf4_of(W) if nf4 else None
    mask, keep = K.make_dropout_mask((M, n_in), p, "cpu", torch.Generator().manual_seed(11))

    def no_mask(*a, **k):
        raise AssertionError("a dropout mask was materialized")

    monkeypatch.setattr(HD, "hash_drop", no_mask)
    monkeypatch.setattr(HD, "hash_drop_reference", no_mask)
    xg, Ag, Bg = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
    y = K.lora_linear(xg, None if nf4 else W, b, Ag, Bg, 0.5, dropout_p=p, nf4=base,
                      generator=torch.Generator().manual_seed(11))
    saved = [t for t in _triton_fn_node(y).saved_tensors if t is not None]
    assert not any(t.dtype in (torch.bool, torch.uint8) for t in saved)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    dx, dA, dB = torch.autograd.grad(y, (xg, Ag, Bg), gy)
    monkeypatch.undo()
    ref = reference(x, None if nf4 else W, b, A, B, 0.5, gy, mask=mask, keep=keep, nf4=base)
    for name, got, want in zip(("y", "dX", "dA", "dB"), (y, dx, dA, dB), ref):
        assert rel_err(got, want) <= TOL[dtype], f"{name}: {rel_err(got, want):.2e}"


def _drop_of(M, n_in, seed=5, thr=19661):
    return LT._Drop(None, torch.tensor(seed, dtype=torch.int64), thr), \
        HD.hash_drop_reference(M, n_in, torch.tensor(seed, dtype=torch.int64), thr)


@pytest.mark.parametrize("cfg", LT.GEMM_CONFIGS, ids=lambda c: str(c.kwargs))
def test_every_gemm_config_runs(cfg):
    """Each GPU launch configuration of the GEMM kernel, forced under the interpreter: the
    forward (NF4 base, low-rank add, bias) and the backward dX (hashed mask)."""
    M, n_in, n_out, r = 37, 70, 45, 8
    x, W, b, A, B = make(M, n_in, n_out, r, torch.float32, bias=True)
    nf4 = nf4_of(W)
    Wd = nf4.dequantize()
    u = torch.randn(M, r, generator=torch.Generator().manual_seed(3))
    y = torch.empty(M, n_out)
    LT._gemm(x, None, nf4, LT._w_strides(None, nf4, True), u, (B, B.stride(1), B.stride(0)), LT._NO_DROP, b, 0.5, y,
            config=cfg)
    assert rel_err(y, x @ Wd.T + b + 0.5 * u @ B.T) <= 1e-5
    gy = torch.randn(M, n_out, generator=torch.Generator().manual_seed(4))
    g = torch.randn(M, r, generator=torch.Generator().manual_seed(5))
    drop, dropped = _drop_of(M, n_in)
    dx = torch.empty(M, n_in)
    LT._gemm(gy, W, None, LT._w_strides(W, None, False), g, (A, A.stride(0), A.stride(1)), drop, None, 0.7, dx,
            config=cfg)
    assert rel_err(dx, gy @ W + (0.7 * g @ A).masked_fill(dropped, 0)) <= 1e-5


@pytest.mark.parametrize("cfg", LT.SHRINK_CONFIGS, ids=lambda c: str(c.kwargs))
def test_every_shrink_config_runs(cfg):
    M, n_in, r = 37, 300, 5
    x, _, _, A, _ = make(M, n_in, 3, r, torch.float32)
    drop, dropped = _drop_of(M, n_in)
    u = LT._shrink(x, A, (A.stride(1), A.stride(0), r), drop, 1.25, config=cfg)
    assert rel_err(u, 1.25 * x.masked_fill(dropped, 0) @ A.T) <= 1e-5


@pytest.mark.parametrize("cfg", LT.OUTER_CONFIGS, ids=lambda c: str(c.kwargs))
def test_every_outer_config_runs(cfg):
    M, n_in, r = 300, 40, 6
    x, _, _, _, _ = make(M, n_in, 3, r, torch.float32)
    g = torch.randn(M, r, generator=torch.Generator().manual_seed(8))
    drop, dropped = _drop_of(M, n_in)
    dA = LT._outer(g, x, drop, 0.5, False, torch.float32, config=cfg)
    assert rel_err(dA, 0.5 * g.T @ x.masked_fill(dropped, 0)) <= 1e-5


def test_autotune_lists_wrap_the_kernels():
    for tuned, kern, cfgs in ((LT._gemm_tuned, LT._lora_gemm_kernel, LT.GEMM_CONFIGS),
                              (LT._shrink_tuned, LT._lora_shrink_kernel, LT.SHRINK_CONFIGS),
                              (LT._outer_tuned, LT._lora_outer_kernel, LT.OUTER_CONFIGS)):
        assert tuned.fn is kern and tuned.configs == cfgs and set(tuned.keys) <= set(tuned.arg_names)
        assert all(v >= 16 for c in cfgs for k, v in c.kwargs.items() if k.startswith("BLOCK"))


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_cuda_lora_fwd_bwd_dropout(dtype, nf4):
    """On CUDA (autotuned kernels, in-kernel dropout): y and the gradients against the fp32
    reference under the mask make_dropout_mask draws from the same CUDA generator state."""
    M, n_in, n_out, r, p = 517, 1000, 777, 16, 0.1
    x, W, b, A, B = make(M, n_in, n_out, r, dtype, bias=True)
    base = nf4_of(W) if nf4 else None
    mask, keep = K.make_dropout_mask((M, n_in), p, "cuda", torch.Generator("cuda").manual_seed(3))
    xc, Ac, Bc = (t.cuda().requires_grad_() for t in (x, A, B))
    y = K.lora_linear(xc, None if nf4 else W.cuda(), b.cuda(), Ac, Bc, 0.5, dropout_p=p,
                      nf4=base.to("cuda") if nf4 else None, generator=torch.Generator("cuda").manual_seed(3))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dx, dA, dB = torch.autograd.grad(y, (xc, Ac, Bc), gy.cuda())
    ref = reference(x, None if nf4 else W, b, A, B, 0.5, gy.cpu(), mask=mask.cpu(), keep=keep, nf4=base)
    tol = {torch.float32: 2e-3, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]  # fp32 may use TF32
    for name, got, want in zip(("y", "dX", "dA", "dB"), (y, dx, dA, dB), ref):
        assert rel_err(got.cpu(), want) <= tol, f"{name} {dtype}: {rel_err(got.cpu(), want):.2e}"


@pytest.mark.gpu
def test_cuda_hash_mask_bit_equal():
    for rows, cols, seed, thr in MASK_CASES:
        s = torch.tensor(seed, dtype=torch.int64)
        assert torch.equal(HD.hash_drop_triton(rows, cols, s.cuda(), thr).cpu(),
                           HD.hash_drop_reference(rows, cols, s, thr))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_token_stats(dtype):
    z = (torch.randn(300, 32003, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    y = torch.randint(0, 32003, (300,), generator=torch.Generator().manual_seed(1))
    got = TS.token_stats(z.cuda(), y.cuda())
    want = TS.token_stats_reference(z, y)
    for g, w in zip(got, want):
        assert g.is_cuda and torch.allclose(g.cpu(), w, rtol=1e-4, atol=1e-4)

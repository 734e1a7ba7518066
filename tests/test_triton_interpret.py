"""TRITON_INTERPRET is read at each launch: set after the kernel modules are imported, it still
takes effect (triton.jit alone decides at import, for qru's kernels and for Triton's own library)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qru.kernels._triton_io import _Kernel
from qru.kernels import hash_dropout, lora_triton, quant_gguf_triton, rmsnorm, swiglu

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import os, torch
assert "TRITON_INTERPRET" not in os.environ
from qru.kernels import rmsnorm, hash_dropout, swiglu, token_stats  # imported with the interpreter off
os.environ["TRITON_INTERPRET"] = "1"                       # turned on before the first launch
os.environ["QRU_BACKEND"] = "triton"
g = torch.Generator().manual_seed(0)
x = torch.randn(5, 40, generator=g)
w = torch.randn(40, generator=g)
got = rmsnorm.rms_norm(x, w, 1e-6)                          # calls the load_f32 / store_f32 device functions
torch.testing.assert_close(got, rmsnorm.rms_norm_reference(x, w, 1e-6), rtol=1e-5, atol=1e-6)
gt, up = torch.randn(2, 7, 19, generator=g)
torch.testing.assert_close(swiglu.swiglu(gt, up), swiglu.swiglu_reference(gt, up))   # tl.sigmoid
z, y = torch.randn(6, 50, generator=g), torch.randint(0, 50, (6,), generator=g)
for a, b in zip(token_stats.token_stats(z, y), token_stats.token_stats_reference(z, y)):  # tl.max / tl.sum
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
s = torch.tensor(123, dtype=torch.int64)
assert torch.equal(hash_dropout.hash_drop_triton(9, 33, s, 20000), hash_dropout.hash_drop_reference(9, 33, s, 20000))
print("ok")
"""


def test_interpret_set_after_import_takes_effect():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "QRU_BACKEND")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_every_kernel_is_decorated_by_qru_jit():
    """Each module's Triton kernels go through qru's jit (a triton.jit kernel would miss the switch)."""
    from triton.runtime.jit import JITFunction

    for mod in (hash_dropout, lora_triton, quant_gguf_triton, rmsnorm, swiglu):
        kernels = [v for v in vars(mod).values() if isinstance(v, JITFunction)]
        assert kernels and all(type(k) is _Kernel for k in kernels), mod.__name__
    assert torch.zeros(1).device.type == "cpu"


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qru.kernels import rmsnorm, swiglu
for k, sig, const in [
    (rmsnorm._rms_fwd_kernel, {"x_ptr": "*i16", "w_ptr": "*i16", "y_ptr": "*i16", "r_ptr": "*fp32", "H": "i32",
                               "eps": "fp32", "BLOCK": "constexpr", "BF16": "constexpr"}, {"BLOCK": 64, "BF16": True}),
    (swiglu._swiglu_fwd_kernel, {"g_ptr": "*fp32", "u_ptr": "*fp32", "o_ptr": "*fp32", "n": "i32",
                                 "BLOCK": "constexpr", "BF16": "constexpr"}, {"BLOCK": 1024, "BF16": False})]:
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in const.items()})
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm
print("ok")
"""


def test_kernels_still_compile_for_the_gpu():
    """Without the interpreter, qru's kernels (with their device-function calls to qru's jit helpers and
    Triton's library) go through Triton's compiler to a CUDA binary; no GPU is needed to compile."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("Triton's CUDA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]

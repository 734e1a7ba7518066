"""A non-editable install keeps the C++ kernels: ``pip install .`` (no dependencies, no build
isolation) into a fresh directory, then a process that sees only that copy of qru builds a kernel
from the installed qru/csrc and checks it against the reference."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from qru.kernels._backend import missing_toolchain

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import torch, qru, qru.kernels._backend as b
from qru.kernels.token_stats import token_stats_reference
site = __import__("sys").argv[1]
assert qru.__file__.startswith(site) and str(b.CSRC).startswith(site), (qru.__file__, b.CSRC)
e = b.load_cpp_ext("token_stats")
assert e is not None, b.build_error("token_stats")
z, y = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3])
for got, want in zip(e.token_stats(z, y), token_stats_reference(z, y)):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.slow
def test_non_editable_install_keeps_and_builds_the_kernels(tmp_path):
    if missing_toolchain() is not None:
        pytest.skip(f"no {missing_toolchain()}")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in (site / "qru" / "csrc").iterdir()} >= {"qru_common.h", "token_stats.cpp", "lora.cpp"}
    # -S: no site module, so no .pth (the editable install of the development checkout) is read;
    # torch comes from this interpreter's site-packages, qru only from the installed copy.
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{sysconfig.get_paths()['purelib']}",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    r = subprocess.run([sys.executable, "-S", "-c", _CHILD, str(site)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]

"""The import layers (qru/__init__.py, contracts in pyproject.toml) hold: ``lint-imports`` passes, and it
does catch an upward import."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install '.[test]')")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_layers_contract_is_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 1 kept, 0 broken." in r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The oracle: a copy of the tree with one function-level import of a workflow inside qru.model."""
    shutil.copytree(ROOT / "qru", tmp_path / "qru", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "qru" / "model" / "config.py", "a") as f:
        f.write("\n\ndef _upward():\n    from qru.quant.export import quantize_checkpoint\n\n    return quantize_checkpoint\n")
    r = _lint(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "qru.model is not allowed to import qru.quant.export" in r.stdout
    assert "qru.model.config -> qru.quant.export" in r.stdout

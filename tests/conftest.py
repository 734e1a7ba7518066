"""Shared test set-up. Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1,
read at each launch). The C++ kernels are loaded per test through ``cpp_helpers.need_cpp``; nothing
here builds them, so the Triton tests never wait on (or fail with) a C++ build."""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The per-machine calibration and the token cache go to a private directory for the session, never
# the user's ~/.cache/qru (unless QRU_CACHE is set: then there). Subprocesses inherit it.
if not os.environ.get("QRU_CACHE"):
    _cache = tempfile.mkdtemp(prefix="qru-test-cache-")
    os.environ["QRU_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One torch thread for the test (conftest sets two): the tiny models gain nothing from a
    second, on shared cores one is far faster, and some paths (oneDNN) take it only then."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(shared_data, tmp_path_factory):
    """The tiny Llama + tokenizer checkpoint of eval_helpers, built once per session."""
    from eval_helpers import tiny_checkpoint

    return tiny_checkpoint(shared_data, tmp_path_factory.getbasetemp() / "eval_tiny")


@pytest.fixture(scope="module")
def model_tok(tiny_dir):
    from qru.model.llama import Llama
    from qru.model.tokenizer import Tokenizer

    return Llama.from_pretrained(tiny_dir).eval(), Tokenizer.from_dir(tiny_dir)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

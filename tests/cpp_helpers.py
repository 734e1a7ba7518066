"""The C++ kernels in tests: skipped where no toolchain can build them, a failure where one can."""
import pytest

from qru.kernels._backend import build_error, load_cpp_ext, missing_toolchain


def need_cpp(name: str):
    """The op namespace of ``qru/csrc/{name}.cpp``. Skips the test when this machine has no C++
    compiler or ninja; fails it when they are there and the build failed (a bug, not "no compiler")."""
    ext = load_cpp_ext(name)
    if ext is not None:
        return ext
    missing = missing_toolchain()
    if missing is not None:
        pytest.skip(f"no {missing}: the C++ kernels cannot be built here")
    pytest.fail(f"the C++ kernel {name}.cpp failed to build: {build_error(name)}")


def use_backend(monkeypatch, backend: str, name: str) -> str:
    """Force ``QRU_BACKEND=backend`` for a test; ``cpp`` first needs ``qru/csrc/{name}.cpp`` (see
    :func:`need_cpp`). Returns the backend: the body of the tests' backend fixtures."""
    if backend == "cpp":
        need_cpp(name)
    monkeypatch.setenv("QRU_BACKEND", backend)
    return backend

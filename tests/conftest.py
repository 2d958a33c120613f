"""Shared test helpers."""
import os

import numpy as np
import pytest

import kernel_emulator
from llmpi.backend import gpu_available

from llmpi.ops import select_cpu_kernels


@pytest.fixture(autouse=True)
def numpy_layers_after_each_test():
    """The CPU table is chosen once per process (a trainer built in-process with train.cpu_kernels
    = auto picks the fused kernels); put back the layers so that no test depends on the order."""
    yield
    select_cpu_kernels("numpy")


def central_diff(f, x, idx=None, h=1e-6):
    """Central finite differences of scalar f() w.r.t. float64 array x (changed in place and restored).

    idx: flat indices to probe (all when None). Returns the derivatives at those indices.
    """
    flat = x.reshape(-1)
    idx = np.arange(flat.size) if idx is None else np.asarray(idx)
    out = np.empty(len(idx))
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        out[j] = (fp - fm) / (2 * h)
    return out


def rel_error(a, b):
    """max |a - b| / max(|a|, |b|, tiny): one number for a whole gradient."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-30))


@pytest.fixture
def numgrad():
    return central_diff


UNDER_MPI = any(v in os.environ for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"))


@pytest.fixture(params=["gpu", "emulated"])
def cp(request, monkeypatch):
    """The array module the kernels run on: CuPy on a GPU, or NumPy with every kernel launch
    going to the CPU kernel emulator (tests/kernel_emulator.py), which checks the kernels'
    arithmetic in CI, where there is no GPU. Tests marked `large` run on the GPU only."""
    if request.param == "gpu":
        if not gpu_available():
            pytest.skip("no GPU")
        import cupy
        return cupy
    if UNDER_MPI:
        pytest.skip("the kernel emulator runs in the single-process pytest pass")
    if request.node.get_closest_marker("large"):
        pytest.skip("too large for the CPU kernel emulator")
    if kernel_emulator.compiler() is None:
        pytest.skip("no C++20 compiler for the kernel emulator")
    kernel_emulator.install(monkeypatch)
    return np

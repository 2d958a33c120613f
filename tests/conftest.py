"""Shared test helpers."""
import numpy as np
import pytest

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

"""Choose the array module `xp` (NumPy or CuPy) once per process.

Only this module and llmpi/gpu/ import cupy. Code that must run on both takes the module
from its inputs with `array_module(a)`; what differs between host and device memory beyond
that (copies, staging, addresses, a scatter-add) is here.
"""
import os

import numpy as np

from .cli import keep_freed_memory
from .errors import UserError

DEVICES = ("cpu", "gpu", "auto")  # train.device
xp = np
device_name = "cpu"


def array_module(a):
    """NumPy or CuPy, whichever owns `a` (like cupy.get_array_module; imports cupy only for
    device arrays, so it is right even before `select` has run)."""
    if is_device_array(a):
        import cupy
        return cupy
    return np


def is_device_array(a) -> bool:
    return type(a).__module__.startswith("cupy")


def gpu_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def select(device: str = "cpu", local_rank: int = 0):
    """Set the process-wide `xp` for device 'cpu', 'gpu' or 'auto'; returns it.

    On the GPU each rank binds device `local_rank % visible_gpus`, so several ranks
    on one node spread over its GPUs (and share them when there are more ranks).
    """
    global xp, device_name
    if device not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)} (got {device!r})")
    if device == "auto":
        device = "gpu" if gpu_available() else "cpu"
    if device == "cpu":
        keep_freed_memory()  # NumPy's activation temporaries reuse heap memory (see there)
        xp, device_name = np, "cpu"
        return xp
    if not gpu_available():
        raise UserError("device 'gpu' was asked for but CuPy or a CUDA device is missing; "
                        "install llmpi[gpu] or use --device cpu")
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    dev = local_rank % n
    cupy.cuda.Device(dev).use()
    props = cupy.cuda.runtime.getDeviceProperties(dev)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    xp, device_name = cupy, f"gpu:{dev} ({name})"
    return xp


def to_host(a):
    """A NumPy copy (or the array itself) of a NumPy or CuPy array."""
    if is_device_array(a):
        return a.get()
    return np.asarray(a)


def address(a) -> int:
    """Device (CuPy) or host (NumPy) address of a's first element, for alignment checks."""
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.ctypes.data


def scatter_add_rows(target, index, rows):
    """target[index[i]] += rows[i] for every i, repeated indices accumulating (which fancy-index
    += would not do). On the host equal-index rows are summed with one sorted reduceat, several
    times faster than np.add.at; CuPy has add.at only."""
    if is_device_array(target):
        array_module(target).add.at(target, index, rows)
        return
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
    target[sorted_index[starts]] += np.add.reduceat(rows[order], starts, axis=0)


def memory_per_rank(ranks_on_node):
    """Bytes of the memory this rank's arrays live in, its share: the node's physical memory over
    its ranks on the CPU; on the GPU the device's memory over the ranks that share it (0 where the
    system does not say)."""
    if xp is np:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, ranks_on_node)
        except (ValueError, OSError, AttributeError):
            return 0
    devices = xp.cuda.runtime.getDeviceCount()
    return xp.cuda.Device().mem_info[1] // max(1, -(-ranks_on_node // devices))


def pinned_empty(n, dtype):
    """A 1-D NumPy array of n elements in page-locked memory: the GPU's copy engine moves it by DMA,
    without a bounce buffer. Needs CuPy."""
    import cupyx
    return cupyx.empty_pinned((n,), dtype=dtype)


def copy_to_host(a, out):
    """out (NumPy) <- a (NumPy or CuPy), finished when this returns."""
    if is_device_array(a):
        a.get(out=out)
    else:
        np.copyto(out, a)


def copy_to_device(host, a):
    """a (NumPy or CuPy) <- host (NumPy), finished when this returns, so `host` may be reused."""
    if is_device_array(a):
        a.set(host)
        synchronize(a)
    else:
        np.copyto(a, host)


def synchronize(a=None):
    """Wait for the current CuPy stream (of a's module when `a` is given, so it is right even
    before `select` ran); needed before MPI touches device memory."""
    module = xp if a is None else array_module(a)
    if module is not np:
        module.cuda.get_current_stream().synchronize()


def threads_hint() -> str:
    return os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS") or "default"

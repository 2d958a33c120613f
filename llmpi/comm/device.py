"""Device (CuPy) buffers in MPI calls: CUDA-aware MPI when there is one, pinned host staging otherwise.

- `mpi_cuda_support()` asks the loaded MPI library itself: mpi4py does not wrap
  MPIX_Query_cuda_support(), but Open MPI (mpi-ext.h) and MPICH >= 4 both export it.
  MPICH answers for this run: its GPU support is switched on at run time with
  MPIR_CVAR_ENABLE_GPU=1.
- `device_direct(setting)` turns the job's `parallel.cuda_aware_mpi` (auto | yes | no) into
  the decision: "auto" trusts the query, "yes" covers a CUDA-aware MPI that does not export
  it, "no" stages even when MPI could take device memory.
- `HostStage` copies device buffers through page-locked host memory: the GPU's copy engine
  reads and writes it directly, while a pageable copy bounces through a driver buffer at a
  fraction of the PCIe/NVLink-C2C rate. Its mirrors are allocated once and grow, since
  pinning memory is slow (it locks pages).
"""
import ctypes
import functools
import os

import numpy as np

from .. import backend

SETTINGS = ("auto", "yes", "no")


def _loaded_libmpi():
    """Path of the MPI library mpi4py loaded (Linux: from /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libmpi" in line and "/" in line}
    except OSError:
        return None
    core = sorted(p for p in paths if os.path.basename(p).startswith("libmpi."))
    return core[0] if core else None


@functools.lru_cache(maxsize=None)
def mpi_cuda_support():
    """(True | False | None, why): whether MPI takes CUDA device buffers; None = cannot tell."""
    from mpi4py import MPI  # the library must be loaded before /proc/self/maps shows it
    path = _loaded_libmpi()
    if path is None:
        return None, "could not locate the loaded MPI library"
    try:
        query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
    except OSError as err:
        return None, str(err)
    if query is None:
        return None, f"{os.path.basename(path)} has no MPIX_Query_cuda_support"
    query.restype = ctypes.c_int
    why = "MPIX_Query_cuda_support"
    if "MPICH" in MPI.Get_library_version():
        why += f", MPIR_CVAR_ENABLE_GPU={os.environ.get('MPIR_CVAR_ENABLE_GPU', 'unset')}"
    return bool(query()), why


def device_direct(setting="auto") -> bool:
    """Whether MPI gets device buffers as they are (True) or host copies (False)."""
    if setting not in SETTINGS:
        raise ValueError(f"cuda_aware_mpi must be one of {SETTINGS}, got {setting!r}")
    if setting == "auto":
        return bool(mpi_cuda_support()[0])
    return setting == "yes"


class HostStage:
    """Page-locked host mirrors (one per dtype, grown on demand) for device buffers.

    `download(dev, offset)` fills mirror[offset:offset + dev.size] from `dev` and returns that
    view; callers with several copies in flight (bucketed non-blocking all-reduces) give each a
    disjoint offset. `upload(host, dev)` copies back and waits, so the mirror can be reused.
    """

    def __init__(self):
        self._mirrors = {}

    def mirror(self, n, dtype, pinned=True):
        key = (str(dtype), pinned)
        buf = self._mirrors.get(key)
        if buf is None or buf.size < n:
            size = max(n, 1)
            buf = backend.pinned_empty(size, dtype) if pinned else np.empty(size, dtype=dtype)
            self._mirrors[key] = buf
        return buf

    def download(self, dev, offset=0):
        """Pinned for device arrays; host arrays (tests) get plain memory."""
        pinned = backend.is_device_array(dev)
        host = self.mirror(offset + dev.size, dev.dtype, pinned)[offset:offset + dev.size]
        backend.copy_to_host(dev, host)
        return host

    def upload(self, host, dev):
        backend.copy_to_device(host, dev)


def describe_buffers(buf, mode, algorithm, setting):
    """The startup line's "gpu buffers:" text for a run whose buffers are like `buf`, or None for
    host buffers (nothing to say)."""
    return describe(mode, algorithm, setting) if backend.is_device_array(buf) else None


def describe(mode, algorithm, setting) -> str:
    """How gradients or parameters on the GPU reach other ranks, for the startup lines."""
    if mode == "async":
        return "RMA windows in host memory, staged through pinned host buffers"
    if algorithm == "nccl":
        return "NCCL, device to device"
    supported, why = mpi_cuda_support()
    told = {True: "CUDA-aware", False: "not CUDA-aware", None: "unknown"}[supported]
    if algorithm == "mpi" and device_direct(setting):
        return f"MPI on device memory (cuda_aware_mpi {setting}; the library says {told}: {why})"
    reason = f"{algorithm} adds on the host" if algorithm != "mpi" else f"cuda_aware_mpi {setting}, MPI {told}"
    return f"staged through pinned host buffers ({reason})"

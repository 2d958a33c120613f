"""`python -m llmpi info [--json]`: what this installation and this MPI launch look like.

The first thing to run on a new cluster or when a bug report comes in: library
versions, the MPI library and whether it takes GPU buffers, the world, thread
settings and where the CUDA kernels are. Every rank takes part (the node count
needs a collective); only rank 0 prints.
"""
import importlib.metadata
import json
import os
import platform
import sys

import numpy as np
from mpi4py import MPI

import llmpi

from . import backend
from .cli import THREAD_VARS, ArgumentParser
from .comm.device import mpi_cuda_support
from .comm.world import launcher_mismatch, rprint
from .errors import UserError
from .gpu.loader import kernel_dir as find_kernel_dir
CUPY_DISTS = ("cupy", "cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x", "cupy-rocm-5-0")


def cuda_aware_mpi() -> str:
    """'yes' / 'no' / 'unknown', with how it was found out (llmpi.comm.device)."""
    supported, why = mpi_cuda_support()
    return f"{ {True: 'yes', False: 'no', None: 'unknown'}[supported]} ({why})"


def _version(dist_names):
    for name in dist_names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cupy_info() -> dict:
    """CuPy and CUDA versions through backend (the one place that imports cupy)."""
    version = _version(CUPY_DISTS)
    if version is None:
        return {"cupy": "not installed", "cuda": "not installed"}
    if not backend.gpu_available():
        return {"cupy": version, "cuda": "no CUDA device visible"}
    backend.select("gpu")
    rt = backend.xp.cuda.runtime
    v, d = rt.runtimeGetVersion(), rt.driverGetVersion()
    return {"cupy": version,
            "cuda": f"runtime {v // 1000}.{v % 1000 // 10}, driver {d // 1000}.{d % 1000 // 10}, "
                    f"{rt.getDeviceCount()} device(s), this rank: {backend.device_name}"}


def blas_name() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy has no dict form; the name is only a hint
        return "unknown"


def kernel_dir() -> str:
    """Where the CUDA sources are: next to the installed package, else the repo's kernels/."""
    try:
        d = find_kernel_dir()
    except UserError:
        return "not found"
    return f"{d} ({len([f for f in os.listdir(d) if f.endswith('.cu')])} .cu files)"


def node_count(comm) -> int:
    """Nodes in the job: ranks that are rank 0 of their shared-memory group."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    leader = np.array([1 if node.Get_rank() == 0 else 0], dtype=np.int64)
    node.Free()
    total = np.zeros(1, dtype=np.int64)
    comm.Allreduce(leader, total, op=MPI.SUM)
    return int(total[0])


def collect(comm=None) -> dict:
    """Every rank must call this (collective); the dict is the same on every rank
    except the CUDA line, which names this rank's device."""
    comm = comm or MPI.COMM_WORLD
    try:
        import h5py
        h5 = f"{h5py.version.version} (HDF5 {h5py.version.hdf5_version})"
    except ImportError:
        h5 = "not installed"
    import mpi4py
    info = {
        "llmpi": f"{llmpi.__version__} ({os.path.dirname(os.path.abspath(llmpi.__file__))})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "numpy": f"{np.__version__} (BLAS: {blas_name()})",
        "h5py": h5,
        "mpi4py": mpi4py.__version__,
        "mpi library": " ".join(MPI.Get_library_version().replace("\x00", "").splitlines()[0].split()),
        "mpi standard": "{}.{}".format(*MPI.Get_version()),
        "world size": f"{comm.Get_size()} rank(s) on {node_count(comm)} node(s)",
        "cuda-aware mpi": cuda_aware_mpi(),
        "launcher": launcher_mismatch() or "matches mpi4py's MPI",
    }
    info.update(cupy_info())
    info["kernels"] = kernel_dir()
    for var in THREAD_VARS:
        info[var] = os.environ.get(var, "unset")
    return info


def main(argv=None):
    p = ArgumentParser(prog="python -m llmpi info",
                       description="Print versions, the MPI world and thread settings (rank 0).")
    p.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    args = p.parse_args(argv)
    info = collect()
    if args.json:
        rprint(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        rprint("\n".join(f"{k:<{width}}  {v}" for k, v in info.items()))
    return 0

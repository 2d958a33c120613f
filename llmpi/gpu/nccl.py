"""NCCL through CuPy: the communicator of an MPI communicator's ranks and the all-reduce call.

llmpi.comm.allreduce.nccl asks this module for NCCL instead of importing CuPy itself. NCCL
needs one GPU per rank: ranks sharing a GPU cannot use it.
"""
import numpy as np

from .. import backend
from ..errors import UserError

ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
_communicators = {}  # id(MPI comm) -> (MPI comm, NCCL communicator); the MPI comm is kept alive


def module():
    """cupy.cuda.nccl, or a UserError naming what to install."""
    try:
        from cupy.cuda import nccl
    except ImportError:
        nccl = None
    if nccl is None or not getattr(nccl, "available", True):
        raise UserError("allreduce 'nccl' needs CuPy with NCCL (cupy-cuda12x or cupy-cuda13x and that CUDA's NCCL "
                        "library); use allreduce 'mpi' instead")
    return nccl


def communicator(comm):
    """The NCCL communicator spanning the ranks of `comm` (collective on first use, then cached).
    Rank 0's unique id travels as an int array with an upper-case Bcast (no pickle)."""
    entry = _communicators.get(id(comm))
    if entry is not None:
        return entry[1]
    nccl = module()
    # CuPy < 14 gives the id as a tuple of 128 signed chars, later CuPy as 128 bytes; the last
    # element says which, so every rank rebuilds the type its CuPy expects
    wire = np.zeros(ID_BYTES + 1, dtype=np.int64)
    if comm.Get_rank() == 0:
        uid = nccl.get_unique_id()
        is_bytes = isinstance(uid, (bytes, bytearray))
        wire[:ID_BYTES] = np.frombuffer(bytes(uid), np.int8) if is_bytes else np.asarray(uid)
        wire[-1] = is_bytes
    comm.Bcast(wire, root=0)
    ids = wire[:ID_BYTES]
    uid = ids.astype(np.int8).tobytes() if wire[-1] else tuple(int(c) for c in ids)
    nc = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
    _communicators[id(comm)] = (comm, nc)
    return nc


def forget(comm):
    """Drop the cached NCCL communicator of `comm` (before freeing it)."""
    _communicators.pop(id(comm), None)


def current_stream(buf):
    """The current CuPy stream of `buf`'s device."""
    return backend.array_module(buf).cuda.get_current_stream()


def allreduce(buf, comm, stream):
    """Queue buf <- sum over the ranks of comm on `stream`, in place (float32 or float64)."""
    nccl = module()
    kind = nccl.NCCL_FLOAT32 if buf.dtype == np.float32 else nccl.NCCL_FLOAT64
    communicator(comm).allReduce(buf.data.ptr, buf.data.ptr, buf.size, kind, nccl.NCCL_SUM, stream.ptr)


_side_streams = {}  # device id -> the stream NCCL's overlapped sums run on


def allreduce_beside(buf, comm, compute):
    """Queue buf <- sum over comm on NCCL's own stream of buf's device, after what `compute` has
    queued so far (an event orders them); -> the event recorded after the sum."""
    cupy = backend.array_module(buf)
    device = buf.device.id
    side = _side_streams.get(device)
    if side is None:
        side = _side_streams[device] = cupy.cuda.Stream(non_blocking=True)
    side.wait_event(compute.record())
    allreduce(buf, comm, side)
    return side.record()


def wait_on_device(done):
    """The current stream waits for the event `done` (allreduce_beside's) before its next kernels."""
    import cupy
    cupy.cuda.get_current_stream().wait_event(done)

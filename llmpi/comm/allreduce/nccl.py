"""NCCL's all-reduce on a device buffer, device to device, queued on the current CuPy stream
(llmpi.gpu.nccl holds the communicator: one per MPI communicator, made from rank 0's unique id).
NCCL needs one GPU per rank: ranks sharing a GPU cannot use it."""
from ... import backend
from ...errors import UserError
from ...gpu import nccl as gpu_nccl

HOST_ONLY = False
ON_STREAM = True  # ordered on the CuPy stream: no host synchronisation before the call


def prepare(comm):
    """Build the NCCL communicator now (collectively), so a missing NCCL fails early on every
    rank rather than mid-step."""
    gpu_nccl.communicator(comm)


def start(view, comm, blocking=False, **_):
    if not backend.is_device_array(view):
        raise UserError("allreduce 'nccl' works on GPU buffers only (--device gpu)")
    stream = gpu_nccl.current_stream(view)
    gpu_nccl.allreduce(view, comm, stream)
    if blocking:
        stream.synchronize()
        return None
    return stream


def finish(handle):
    if handle is not None:
        handle.synchronize()


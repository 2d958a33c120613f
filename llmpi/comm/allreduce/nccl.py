"""NCCL's all-reduce on a device buffer, device to device, queued on the current CuPy stream
(llmpi.gpu.nccl holds the communicator: one per MPI communicator, made from rank 0's unique id).
NCCL needs one GPU per rank: ranks sharing a GPU cannot use it."""
from ... import backend
from ...errors import UserError
from ...gpu import nccl as gpu_nccl

HOST_ONLY = False
ON_STREAM = True  # ordered by CUDA streams and events: no host synchronisation before the call


def prepare(comm):
    """Build the NCCL communicator now (collectively), so a missing NCCL fails early on every
    rank rather than mid-step."""
    gpu_nccl.communicator(comm)


def start(view, comm, blocking=False, **_):
    """blocking: the sum on the current stream, waited for. Otherwise (an overlapped bucket) the
    sum goes on NCCL's own stream once the current one has produced the bucket, so the backward
    kernels queued after it run while NCCL works; the handle is the event that ends it."""
    if not backend.is_device_array(view):
        raise UserError("allreduce 'nccl' works on GPU buffers only (--device gpu)")
    stream = gpu_nccl.current_stream(view)
    if not blocking:
        return gpu_nccl.allreduce_beside(view, comm, stream)
    gpu_nccl.allreduce(view, comm, stream)
    stream.synchronize()
    return None


def finish(handle):
    """The current stream waits, on the device, for the overlapped sum (no host wait: the next
    kernels, the optimizer's, are queued after it)."""
    if handle is not None:
        gpu_nccl.wait_on_device(handle)


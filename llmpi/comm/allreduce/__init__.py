"""Sum all-reduce of one contiguous 1-D buffer, one algorithm per module, chosen by name.

Every algorithm module has the same shape: `start(view, comm, blocking, **options) -> handle`,
`finish(handle)`, and HOST_ONLY (it adds on the host, so device buffers are staged:
llmpi.comm.allreduce.staged). Each works in place, is a no-op for one process, and leaves every
rank with a bitwise identical result (each element is summed in one fixed order, then copied),
so data-parallel replicas never drift apart.

  mpi    MPI_Allreduce(IN_PLACE), the reference (MPI_Iallreduce when overlapped)
  ring   pipelined reduce-scatter + all-gather, bandwidth-optimal; its halves are
         llmpi.comm.allreduce.ring.reduce_scatter / all_gather
  rd     recursive doubling, latency-optimal
  auto   rd below a measured size, ring above (llmpi.comm.allreduce.auto)
  nccl   NCCL on device buffers, ordered on the CuPy stream (overlapped buckets: on its own stream)

Adding an algorithm is one module here and one line in ALGORITHMS; `parallel.allreduce` and
`python -m llmpi.train --help` take their allowed values from it. Bucketed and overlapped
reduction of the gradient buffer is llmpi.comm.buckets.
"""
from . import auto, mpi, nccl, recursive_doubling, ring
from ._p2p import DEFAULT_SEGMENT_BYTES
from .staged import Staging

ALGORITHMS = {"mpi": mpi, "ring": ring, "rd": recursive_doubling, "auto": auto, "nccl": nccl}
_staging = {}  # cuda_aware_mpi setting -> Staging, for the blocking calls


def get(name):
    """The algorithm module registered as `name`."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {name!r}; choose one of {tuple(ALGORITHMS)}")
    return ALGORITHMS[name]


def check(buf):
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        raise ValueError("all-reduce needs a contiguous 1-D array")
    if buf.dtype.name not in ("float32", "float64"):
        raise ValueError(f"all-reduce supports float32/float64, got {buf.dtype}")


def allreduce_sum(buf, comm, algorithm="mpi", segment_bytes=DEFAULT_SEGMENT_BYTES, cuda_aware_mpi="auto"):
    """buf <- sum over ranks of buf, in place, on every rank of comm (blocking)."""
    module = get(algorithm)
    check(buf)
    if comm.Get_size() == 1 or buf.size == 0:
        return buf
    if cuda_aware_mpi not in _staging:
        _staging[cuda_aware_mpi] = Staging(cuda_aware_mpi)
    staging = _staging[cuda_aware_mpi]
    staging.finish(staging.start(module, buf, comm, blocking=True, segment_bytes=segment_bytes))
    return buf

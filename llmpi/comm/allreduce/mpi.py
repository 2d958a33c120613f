"""MPI's own all-reduce, the reference: MPI_Allreduce(IN_PLACE) blocking, MPI_Iallreduce when the
caller overlaps it with backward. Host memory, or device memory when MPI is CUDA-aware."""
from mpi4py import MPI

HOST_ONLY = False  # device buffers go to MPI as they are when it is CUDA-aware (llmpi.comm.device)


def start(view, comm, blocking=False, **_):
    if blocking:
        comm.Allreduce(MPI.IN_PLACE, view, op=MPI.SUM)
        return None
    return comm.Iallreduce(MPI.IN_PLACE, view, op=MPI.SUM)


def finish(handle):
    if handle is not None:
        handle.Wait()

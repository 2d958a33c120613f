"""The job's world: a private communicator, this rank, rank-0 printing, agreement.

`agree` turns a check that may fail on only some ranks into one that fails on all of
them, so bad input never deadlocks the job (llmpi.cli.run_main then exits every rank).
mpi4py is imported on first use: importing this module initialises nothing.
"""
from ..errors import UserError


def _mpi():
    # mpi4py initialises MPI on import; one-process runs still work without mpiexec.
    from mpi4py import MPI
    return MPI


_WORLD = None


def world():
    """A private clone of COMM_WORLD, so our traffic never matches a user's."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _mpi().COMM_WORLD.Dup()
    return _WORLD


def rank() -> int:
    return _mpi().COMM_WORLD.Get_rank()


def rprint(*args, **kwargs):
    """Print from rank 0 only, flushed, so logs interleave sanely."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def local_rank() -> int:
    """This rank's index among the ranks on its node (COMM_TYPE_SHARED split)."""
    MPI = _mpi()
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED, key=MPI.COMM_WORLD.Get_rank())
    r = node.Get_rank()
    node.Free()
    return r


def agree(check, comm=None):
    """Run `check()` on every rank; if it raises UserError on any rank, raise the
    lowest failing rank's message on all ranks. Returns check()'s value."""
    comm = comm or world()
    value, message = None, None
    try:
        value = check()
    except UserError as err:
        message = str(err)
    if comm.Get_size() == 1:
        if message is not None:
            raise UserError(message)
        return value
    messages = comm.allgather(message)
    for m in messages:
        if m is not None:
            raise UserError(m)
    return value

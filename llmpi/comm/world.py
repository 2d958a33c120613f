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


def local_rank(comm=None) -> int:
    """This rank's index among the ranks of `comm` (default COMM_WORLD) on its node
    (COMM_TYPE_SHARED split; collective on comm)."""
    MPI = _mpi()
    comm = comm or MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
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


# What a launcher tells the processes it starts about their number, by launcher family.
LAUNCHER_SIZE_VARS = (("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun/mpiexec"), ("PMI_SIZE", "an MPICH/Hydra or PMI launcher"),
                      ("PMIX_SIZE", "a PMIx launcher (Open MPI 5, Slurm)"), ("SLURM_STEP_NUM_TASKS", "srun"))


def launcher_mismatch():
    """None, or the line saying that the launcher started N processes while mpi4py's MPI sees a
    world of one: a launcher of another MPI than the one mpi4py was built with starts N singletons,
    each of which would train the same run as rank 0 of 1."""
    MPI = _mpi()
    if MPI.COMM_WORLD.Get_size() != 1:
        return None
    import os
    for var, who in LAUNCHER_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            library = " ".join(MPI.Get_library_version().replace("\x00", "").split()[:3])
            return (f"the launcher started {value} processes ({var}={value}: {who}) but mpi4py's MPI ({library}) "
                    "sees a world of 1: launch with the mpiexec of the MPI mpi4py was built with, or rebuild "
                    "mpi4py against this launcher's MPI (pip install --no-binary=mpi4py mpi4py)")
    return None

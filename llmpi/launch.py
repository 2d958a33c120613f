"""Process set-up that must happen before NumPy or MPI start (imports nothing heavy).

BLAS and OpenMP read their thread counts once, at import: with several ranks on a
node each rank must use its share of the cores, or the ranks fight over them.
"""
import os

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "PMI_SIZE")


def ranks_on_this_node() -> int:
    """Best guess of the ranks sharing this node, from the launcher's environment."""
    for var in LOCAL_SIZE_VARS:
        value = os.environ.get(var, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def set_thread_defaults():
    """Give each rank cores // ranks_on_node BLAS threads unless the user chose."""
    if any(v in os.environ for v in THREAD_VARS):
        return
    threads = str(max(1, (os.cpu_count() or 1) // ranks_on_this_node()))
    for var in THREAD_VARS:
        os.environ[var] = threads

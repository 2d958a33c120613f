"""Process plumbing shared by every entry point: set-up before NumPy and MPI start, the
argument parser, and the job-wide error policy.

Imports nothing heavy at module level: `set_thread_defaults` must run before NumPy loads
BLAS (BLAS and OpenMP read their thread counts once, at import), so the entry points call
it first.

Rules `run_main` enforces:
- an uncaught exception on any rank prints its traceback once, tagged with the rank, and
  aborts the whole job (no rank is left waiting in a collective);
- a `UserError` raised the same way on every rank exits every rank with code 2 after
  rank 0 prints the one-line message (llmpi.comm.world.agree makes a check that fails on
  some ranks fail on all of them).
"""
import argparse
import ctypes
import ctypes.util
import os
import sys
import time
import traceback

from .comm.world import launcher_mismatch, rank
from .errors import EXIT_USER_ERROR, UserError

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
    """Give each rank cores // ranks_on_node BLAS threads unless the user chose: with several
    ranks on a node each must use its share of the cores, or the ranks fight over them."""
    if any(v in os.environ for v in THREAD_VARS):
        return
    threads = str(max(1, (os.cpu_count() or 1) // ranks_on_this_node()))
    for var in THREAD_VARS:
        os.environ[var] = threads


def keep_freed_memory():
    """Stop glibc from returning freed activation-sized blocks to the OS.

    By default glibc mmaps each block over 128 KiB and unmaps or trims it on free, so
    every (B, T, 4C) temporary of every step pays fresh page faults; that costs more
    than the arithmetic (a 20x slower GELU backward at the baby shape). Raising the
    mmap and trim thresholds keeps the freed memory in the heap for reuse (peak RSS
    is unchanged: it is the steady-state working set). No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        if not libc.mallopt(M_MMAP_THRESHOLD, 1 << 30):
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc builds that cap the threshold
    except (OSError, AttributeError):
        pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse for entry points launched on many ranks: help and usage print on rank 0 only,
    and a bad argument raises UserError (run_main: one line from rank 0, exit 2 everywhere)
    instead of one usage block per rank."""

    def _print_message(self, message, file=None):
        if rank() == 0:
            super()._print_message(message, file)

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")


def _mpi():
    from mpi4py import MPI  # initialises MPI; one-process runs still work without mpiexec
    return MPI


def abort_on_exception(exc_type, exc, tb):
    """sys.excepthook: print once with the rank, then end every rank of the job."""
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write(f"[rank {rank()}] uncaught exception, aborting the job:\n{text}")
    sys.stderr.flush()
    MPI = _mpi()
    if MPI.COMM_WORLD.Get_size() > 1:
        time.sleep(0.5)  # let the launcher forward our stderr before Abort tears the job down
        MPI.COMM_WORLD.Abort(1)
    os._exit(1)


def user_error_exit(err: UserError, prog: str = "llmpi"):
    """Every rank raised the same UserError: rank 0 prints one line, all exit 2."""
    if rank() == 0:
        sys.stderr.write(f"{prog}: error: {err}\n")
        sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def run_main(main, argv=None, prog="llmpi", check_launcher=True):
    """Run an entry point with the job-wide error policy described above; first, unless told not
    to (`python -m llmpi info` reports it instead), refuse a launcher of another MPI."""
    sys.excepthook = abort_on_exception
    try:
        mismatch = check_launcher and launcher_mismatch()
        if mismatch:
            raise UserError(mismatch)
        return main(argv)
    except UserError as err:
        user_error_exit(err, prog)
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank, but not at the same point: one may leave while the others
        # already wait inside a collective, so with several ranks the job is aborted, not exited.
        if rank() == 0:
            sys.stderr.write(f"{prog}: interrupted\n")
            sys.stderr.flush()
        MPI = _mpi()
        if MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(130)
        sys.exit(130)
    except BrokenPipeError:
        # stdout went to a pager or `head` that has closed: stop quietly, not with a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except SystemExit:
        raise
    except BaseException:
        abort_on_exception(*sys.exc_info())

"""MPI plumbing shared by every entry point: the world, error handling, agreement.

Rules this module enforces:
- an uncaught exception on any rank prints its traceback once, tagged with the
  rank, and aborts the whole job (no rank is left waiting in a collective);
- a `UserError` raised the same way on every rank exits every rank with code 2
  after rank 0 prints the one-line message;
- `agree` turns a check that may fail on only some ranks into one that fails
  on all of them, so bad input never deadlocks the job.
"""
import argparse
import os
import sys
import time
import traceback

from ..errors import EXIT_USER_ERROR, UserError


def _mpi():
    # mpi4py initialises MPI on import; one-process runs still work without mpiexec.
    from mpi4py import MPI
    return MPI


def world():
    """A private clone of COMM_WORLD, so our traffic never matches a user's."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _mpi().COMM_WORLD.Dup()
    return _WORLD


_WORLD = None


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse for entry points launched on many ranks: help and usage print on rank 0 only,
    and a bad argument raises UserError (run_main: one line from rank 0, exit 2 everywhere)
    instead of one usage block per rank."""

    def _print_message(self, message, file=None):
        if rank() == 0:
            super()._print_message(message, file)

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")


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


def run_main(main, argv=None, prog="llmpi"):
    """Run an entry point with the job-wide error policy described above."""
    sys.excepthook = abort_on_exception
    try:
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

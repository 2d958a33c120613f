"""How the ranks of a prepare job keep step: the whole job's progress on rank 0 (MB/s, ETA), a
failure on one rank stopping the others soon, and waiting for rank 0 without blocking signals.

Ranks work through shares of different sizes at their own pace, so nothing here waits for
another rank until its own share is done: progress and failure travel in a non-blocking
all-reduce that is restarted whenever the previous one has completed (`Exchange`).
"""
import sys
import time

import numpy as np

from ..errors import UserError

POLL_SECONDS = 0.005  # waits poll in Python, so Ctrl-C and SIGTERM are handled while a rank waits


class Progress:
    """A bar on a terminal, a plain line every few seconds otherwise, nothing when disabled."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.done = self.tokens = 0
        self.t0 = self.last = time.perf_counter()

    def show(self, done: int, tokens: int):
        """The job's input bytes and tokens so far."""
        self.done, self.tokens = done, tokens
        now = time.perf_counter()
        if self.enabled and now - self.last >= (0.1 if self.tty else 2.0):
            self.last = now
            self._print(now, end="" if self.tty else "\n")

    def close(self):
        if self.enabled:
            self._print(time.perf_counter(), end="\n")

    def _print(self, now, end):
        frac = min(self.done / self.total, 1.0)
        seconds = max(now - self.t0, 1e-9)
        eta = (1 - frac) * seconds / frac if frac > 0 else float("nan")
        eta_text = f"{int(eta) // 60}:{int(eta) % 60:02d}" if eta == eta else "?"
        tokens = f" {self.tokens / seconds / 1e6:.2f} Mtok/s" if self.tokens else ""
        text = (f"{100 * frac:5.1f}% {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                f"{self.done / seconds / 1e6:.2f} MB/s{tokens} ETA {eta_text}")
        if self.tty:
            text = f"\r{self.label}: [{'#' * int(30 * frac):<30}] {text}"
        else:
            text = f"{self.label}: {text}"
        sys.stderr.write(text + end)
        sys.stderr.flush()


def wait(request):
    """Wait for an MPI request, polling (a blocking Wait would hold off Python's signal handlers)."""
    while not request.Test():
        time.sleep(POLL_SECONDS)


class Exchange:
    """(input bytes, tokens, failed, finished) summed over the ranks, refreshed in the background.

    Every rank starts the k-th non-blocking all-reduce after seeing the (k-1)-th result, and all
    ranks stop restarting after the first result in which a rank failed or all have finished:
    the results are the same everywhere, so they stop after the same one."""

    def __init__(self, comm, bar: Progress):
        from mpi4py import MPI
        self.comm, self.bar, self.sum = comm, bar, MPI.SUM
        self.mine = np.zeros(4, np.int64)      # bytes, tokens, failed, finished of this rank
        self.sent = np.zeros(4, np.int64)      # what the running all-reduce sends: untouched until it completes
        self.total = np.zeros(4, np.int64)
        self.over = False
        self._start()

    def _start(self):
        self.sent[:] = self.mine
        self.request = self.comm.Iallreduce(self.sent, self.total, op=self.sum)

    def _completed(self):
        self.bar.show(int(self.total[0]), int(self.total[1]))
        self.over = bool(self.total[2]) or self.total[3] == self.comm.Get_size()
        if not self.over:
            self._start()

    def add(self, nbytes: int, ntokens: int) -> bool:
        """Count this rank's work; True when another rank has failed (stop working)."""
        self.mine[0] += nbytes
        self.mine[1] += ntokens
        if not self.over and self.request.Test():
            self._completed()
        return bool(self.over and self.total[2])

    def finish(self, failed: bool):
        """This rank's share is done (or failed): keep exchanging until every rank is done or one failed."""
        self.mine[2 if failed else 3] = 1
        while not self.over:
            wait(self.request)
            self._completed()
        self.bar.close()


def across_ranks(comm, work, bar: Progress):
    """work(exchange) on every rank; returns this rank's result. A UserError on any
    rank stops the others at their next `exchange.add` and is raised on all ranks; another
    exception is re-raised where it happened (a bug: it aborts the job with its traceback)."""
    exchange = Exchange(comm, bar)
    result = error = bug = None
    try:
        result = work(exchange)
    except UserError as err:
        error = str(err)
    except Exception as err:
        error, bug = f"rank {comm.Get_rank()} failed: {err!r}", err
    exchange.finish(failed=error is not None)
    errors = comm.allgather(error)
    if bug is not None:
        raise bug
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first)
    return result


def from_root(comm, task):
    """task() on rank 0 while the others wait (polling); its value, or its UserError, on every rank."""
    value = error = None
    if comm.Get_rank() == 0:
        try:
            value = task()
        except UserError as err:
            error = str(err)
    wait(comm.Ibarrier())
    value, error = comm.bcast((value, error), root=0)
    if error is not None:
        raise UserError(error)
    return value

"""The process's side of a run: the stop request of a signal, injected faults (the tests' hook),
the hang watchdog, and the --slowdown factors.
"""
import faulthandler
import functools
import os
import signal
import sys
import threading
import time

from ..comm.world import rprint
from ..errors import UserError

FAULT_ENV = "LLMPI_FAULT"  # the tests' hook, see Fault


def parse_slowdown(spec: str, world: int) -> dict:
    """'1=2.0,3=1.5' -> {1: 2.0, 3: 1.5}, checked against the world size."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            r, f = item.split("=")
            r, f = int(r), float(f)
        except ValueError:
            raise UserError(f"--slowdown item {item!r} must look like RANK=FACTOR, e.g. 1=2.0") from None
        if not 0 <= r < world or f < 1.0:
            raise UserError(f"--slowdown {item!r}: rank must be in 0..{world - 1} and FACTOR >= 1")
        out[r] = f
    return out


class StopFlag:
    """SIGTERM/SIGUSR1 (Slurm's warning before the time limit) and a first Ctrl-C ask for
    checkpoint-and-exit at the end of the step (the request travels in the step's collective,
    so every rank stops at the same step); a second Ctrl-C aborts the job (run_main)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if not self.requested:
                rprint("interrupt: checkpointing at the end of this step (Ctrl-C again aborts)")
        self.requested = True


class Fault:
    """LLMPI_FAULT: "RANK:STEP" raises on that rank at that step (the abort path); "RANK:STEP:USR1"
    sends that rank SIGUSR1 instead (checkpoint and exit without timing races); "RANK:STEP:HANG"
    makes it stop responding (the watchdog's test)."""

    def __init__(self, rank):
        self.rank = rank
        parts = os.environ.get(FAULT_ENV, "").split(":")
        self.at = (int(parts[1]), parts[2] if len(parts) > 2 else "") if len(parts) >= 2 and \
            int(parts[0]) == rank else None

    def check(self, step):
        if self.at is None or step != self.at[0]:
            return
        if self.at[1] == "USR1":
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        if self.at[1] == "HANG":
            while True:
                time.sleep(3600)
        raise RuntimeError(f"{FAULT_ENV}: injected failure on rank {self.rank} at step {step}")


class Watchdog:
    """train.watchdog_s: once a step has completed (so first-use data preparation and kernel
    compilation never trip it), a rank that sees no further step complete for that long (stuck in
    a collective, an RMA call, or a computation another rank waits for) prints, once, that it is
    late and where it is (the stacks of its threads), then aborts the whole job. A timer thread does
    it (mpi4py releases the GIL inside MPI calls); faulthandler's C-level timer, a little later,
    dumps and exits even if the GIL never comes back."""

    GRACE = 30.0  # seconds the C-level fallback waits beyond the timer

    def __init__(self, rank, seconds):
        self.rank, self.seconds = rank, float(seconds)
        self.timer, self.step = None, 0

    def step_done(self):
        if self.seconds <= 0:
            return
        self.step += 1
        if self.timer is not None:
            self.timer.cancel()
        self.timer = threading.Timer(self.seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()
        faulthandler.dump_traceback_later(self.seconds + self.GRACE, exit=True)

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            faulthandler.cancel_dump_traceback_later()

    def _fire(self):
        sys.stderr.write(f"[rank {self.rank}] watchdog: no step completed for {self.seconds:g} s after step "
                         f"{self.step} (train.watchdog_s); this rank is late or waits for a late one, here:\n")
        faulthandler.dump_traceback(all_threads=True)
        sys.stderr.flush()
        from mpi4py import MPI
        time.sleep(0.5)  # let the launcher forward the stacks before Abort tears the job down
        MPI.COMM_WORLD.Abort(3)


def disarms_watchdog(loop):
    """A training loop (loop(run) -> status) that disarms run.watchdog when it returns or raises,
    so a caller that goes on in the same process (a test, a notebook) is not aborted by the armed
    timer minutes later."""
    @functools.wraps(loop)
    def disarming(run):
        try:
            return loop(run)
        finally:
            run.watchdog.stop()
    return disarming

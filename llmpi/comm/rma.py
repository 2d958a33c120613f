"""One-sided (RMA, passive target) parameter store for asynchronous training.

`ShardedWindow` keeps one flat vector of n elements in `MPI.Win.Allocate` windows,
cut into contiguous shards, one per rank ("sharded") or all of it on rank 0
("rank0"). Workers `get` the whole vector with `MPI_Get_accumulate(NO_OP)` and
`accumulate` their update with `MPI_Accumulate(SUM)`; accumulate-type calls are
element-wise atomic with each other, so concurrent pushes never lose an update and a
read never sees half of one (a plain MPI_Get would be allowed to). `VersionCounter` is an
int64 on one rank bumped with `MPI_Fetch_and_op`.

Progress: one `Lock_all(MODE_NOCHECK)` epoch for the window's lifetime, completed with
`Flush(target)` after each operation, never waits for a target that is busy computing, where
a Lock/Unlock pair per operation waited for the target's next MPI call (the whole compute
phase); MPIR_CVAR_ASYNC_PROGRESS is not needed, and on oversubscribed nodes it costs more than
it helps. The figures, measured with this module's main
(`mpiexec -n 4 python -m llmpi.comm.rma`), are in BENCHMARKS.md ("MPI progress for passive-target RMA"); across
nodes, netmod RMA without hardware offload may still need target progress: there set the
variable before MPI_Init and check with that command.
Exclusive locks would conflict with that epoch, so `put_all` (initialisation,
resume) writes with Accumulate(MPI_REPLACE), an element-wise atomic put.
`local` is the owner's shard (a read-only view for checkpoints and debugging).
Device (CuPy) vectors are staged through page-locked host memory (llmpi.comm.device): RMA on
device memory is not something MPI implementations offer reliably, and the windows live in
host memory anyway.
"""
import os
import time

import numpy as np
from mpi4py import MPI
from mpi4py.util import dtlib

from .. import backend
from .device import HostStage

DEFAULT_SEGMENT_BYTES = 16 << 20  # bounded message size per RMA call
SERVERS = ("sharded", "rank0")  # parallel.server: shards on every rank, or all on rank 0


class _Lock:
    """`with _Lock(win, target, exclusive):` an MPI passive-target epoch."""

    def __init__(self, win, target, exclusive=False):
        self.win, self.target = win, target
        self.kind = MPI.LOCK_EXCLUSIVE if exclusive else MPI.LOCK_SHARED

    def __enter__(self):
        self.win.Lock(self.target, self.kind)
        return self.win

    def __exit__(self, *exc):
        self.win.Unlock(self.target)
        return False


def shard_bounds(n, p, server="sharded"):
    """[lo_r, hi_r) of each rank's shard: contiguous, near-equal, or all on rank 0."""
    if server == "rank0":
        return [(0, n)] + [(n, n)] * (p - 1)
    return [((r * n) // p, ((r + 1) * n) // p) for r in range(p)]


class _EpochWindow:
    """An MPI window held in one Lock_all epoch for its lifetime: `free()` (collective) ends the
    epoch and releases it; `with` frees it on exit."""

    win = MPI.WIN_NULL

    def free(self):
        if self.win != MPI.WIN_NULL:
            self.win.Unlock_all()
            self.win.Free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()
        return False


class ShardedWindow(_EpochWindow):
    """A flat vector of n elements held in RMA windows; see the module doc.

    `init` (optional, the same full vector on every rank) fills the windows
    collectively at construction; otherwise they start at zero. Construction and
    `free` are collective; get/accumulate/put_all are not.
    """

    def __init__(self, comm, n, dtype=np.float32, server="sharded", init=None,
                 segment_bytes=DEFAULT_SEGMENT_BYTES):
        if server not in SERVERS:
            raise ValueError(f"server must be one of {SERVERS}, got {server!r}")
        self.comm, self.n, self.server = comm, int(n), server
        self.dtype = np.dtype(dtype)
        self.mpi_type = dtlib.from_numpy_dtype(self.dtype)
        self.bounds = shard_bounds(self.n, comm.Get_size(), server)
        self.lo, self.hi = self.bounds[comm.Get_rank()]
        self.seg = max(1, segment_bytes // self.dtype.itemsize)
        self._stage = HostStage()
        item = self.dtype.itemsize
        self.win = MPI.Win.Allocate((self.hi - self.lo) * item, item, comm=comm)
        mem = self.win.tomemory()
        self.local = np.frombuffer(mem, dtype=self.dtype, count=self.hi - self.lo)
        with _Lock(self.win, comm.Get_rank(), exclusive=True):
            if init is None:
                self.local[...] = 0
            else:
                self.local[...] = np.asarray(init, dtype=self.dtype).reshape(-1)[self.lo:self.hi]
        comm.Barrier()  # no one reads a shard before its owner filled it
        self.win.Lock_all(MPI.MODE_NOCHECK)

    def _targets(self, vec):
        """(rank, [(view of vec, target displacement), ...]) per non-empty shard; the
        views are segments of at most segment_bytes, so messages stay bounded."""
        if vec.shape != (self.n,) or vec.dtype != self.dtype or not vec.flags.c_contiguous:
            raise ValueError(f"expected a contiguous ({self.n},) {self.dtype} array, "
                             f"got {vec.shape} {vec.dtype}")
        for rank, (lo, hi) in enumerate(self.bounds):
            if hi > lo:
                yield rank, [(vec[a:min(a + self.seg, hi)], a - lo) for a in range(lo, hi, self.seg)]

    def get(self, out):
        """out <- the whole vector (each element as some accumulate left it).
        A device (CuPy) `out` is filled through a pinned host copy."""
        if backend.is_device_array(out):
            host = self.get(self._stage.mirror(out.size, out.dtype)[:out.size])
            self._stage.upload(host, out)
            return out
        for rank, pieces in self._targets(out):
            for view, disp in pieces:
                # Get_accumulate(NO_OP), not Get: MPI makes reads atomic against concurrent
                # accumulates only among accumulate-type calls (a plain Get may see a torn element)
                self.win.Get_accumulate([None, 0, self.mpi_type], [view, self.mpi_type], rank,
                                        target=(disp, view.size, self.mpi_type), op=MPI.NO_OP)
            self.win.Flush(rank)
        return out

    def accumulate(self, vec):
        """vector += vec, element-wise atomically, concurrently with other ranks."""
        self._accumulate(vec, MPI.SUM)

    def put_all(self, vec):
        """vector <- vec (initialisation, resume), from any one rank.

        Accumulate with MPI_REPLACE is an element-wise atomic put, so it stays
        well-defined next to other ranks' accumulates inside the window's shared
        lock_all epoch, where an exclusive lock would break the MODE_NOCHECK promise."""
        self._accumulate(vec, MPI.REPLACE)

    def _accumulate(self, vec, op):
        if backend.is_device_array(vec):
            backend.synchronize(vec)
            vec = self._stage.download(vec)
        for rank, pieces in self._targets(vec):
            for view, disp in pieces:
                self.win.Accumulate([view, self.mpi_type], rank,
                                    target=(disp, view.size, self.mpi_type), op=op)
            self.win.Flush(rank)

    def free(self):
        self.local = None
        super().free()


class VersionCounter(_EpochWindow):
    """A global int64 counter on `root`, bumped atomically by any rank."""

    def __init__(self, comm, root=0):
        self.comm, self.root = comm, root
        size = 8 if comm.Get_rank() == root else 0
        self.win = MPI.Win.Allocate(size, 8, comm=comm)
        if comm.Get_rank() == root:
            with _Lock(self.win, root, exclusive=True):
                np.frombuffer(self.win.tomemory(), dtype=np.int64)[0] = 0
        comm.Barrier()
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self._one = np.zeros(1, dtype=np.int64)
        self._old = np.zeros(1, dtype=np.int64)

    def _op(self, k, op):
        self._one[0] = k
        self.win.Fetch_and_op(self._one, self._old, self.root, 0, op)
        self.win.Flush(self.root)
        return int(self._old[0])

    def fetch_add(self, k=1) -> int:
        """Add k; returns the value before the addition."""
        return self._op(k, MPI.SUM)

    def read(self) -> int:
        return self._op(0, MPI.NO_OP)

def measure_progress(comm, busy_seconds=0.5, n=1 << 16):
    """Latency of Get + Accumulate + Fetch_and_op to rank 0 while rank 0 computes
    without MPI calls for busy_seconds; origins loop for 80% of that time.

    Returns (median, worst) seconds per round on origin ranks, (0, 0) on rank 0.
    """
    with ShardedWindow(comm, n, np.float64, server="rank0") as w, VersionCounter(comm) as v:
        comm.Barrier()
        t_end = time.perf_counter() + busy_seconds
        if comm.Get_rank() == 0:
            while time.perf_counter() < t_end:  # pure Python compute, no MPI
                sum(range(1000))
            comm.Barrier()
            return 0.0, 0.0
        vec, out = np.ones(n), np.empty(n)
        times = []
        while time.perf_counter() < t_end - 0.2 * busy_seconds:
            t0 = time.perf_counter()
            w.get(out)
            w.accumulate(vec)
            v.fetch_add(1)
            times.append(time.perf_counter() - t0)
        comm.Barrier()
        return float(np.median(times)), float(np.max(times))


if __name__ == "__main__":
    from .world import rprint, world
    c = world()
    med, worst = measure_progress(c)
    res = np.array([med, worst])
    c.Allreduce(MPI.IN_PLACE, res, op=MPI.MAX)
    rprint(f"RMA Get+Accumulate (512 KiB) + Fetch_and_op to a busy rank 0: median {res[0] * 1e3:.2f} ms, "
           f"worst {res[1] * 1e3:.2f} ms (busy 500 ms), "
           f"MPIR_CVAR_ASYNC_PROGRESS={os.environ.get('MPIR_CVAR_ASYNC_PROGRESS', 'unset')}")

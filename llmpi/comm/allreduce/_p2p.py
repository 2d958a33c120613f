"""What our point-to-point algorithms (ring, recursive doubling) share: the tag, waiting without
hogging a shared core, scratch buffers, chunk bounds."""
import os

import numpy as np
from mpi4py import MPI

DEFAULT_SEGMENT_BYTES = 1 << 20
TAG = 0x4C4C  # our point-to-point traffic; below 32767, the smallest MPI_TAG_UB allowed
# Waiting by Test + sched_yield instead of MPI's busy Wait hands the core to a rank
# that has work when ranks outnumber cores; with a core per rank it costs nothing.
YIELD_WHILE_WAITING = True

_scratch = {}


def wait(req):
    if YIELD_WHILE_WAITING:
        while not req.Test():
            os.sched_yield()
    else:
        req.Wait()


def waitall(reqs):
    if YIELD_WHILE_WAITING:
        while not MPI.Request.Testall(reqs):
            os.sched_yield()
    else:
        MPI.Request.Waitall(reqs)


def scratch_for(n, dtype):
    """A receive buffer of at least n elements, allocated once per dtype and grown."""
    key = np.dtype(dtype).str
    buf = _scratch.get(key)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1), dtype=dtype)
        _scratch[key] = buf
    return buf[:n]


def bounds(n, p):
    """Chunk c is [b[c], b[c+1]); sizes differ by at most one, some may be empty."""
    return [(c * n) // p for c in range(p + 1)]

"""Pipelined ring all-reduce: reduce-scatter then all-gather around the ring, P-1 steps each;
every rank sends 2(P-1)/P * n bytes (bandwidth-optimal). Each step's chunk is cut into segments
of `segment_bytes` that are pipelined: segment j is forwarded to the next rank as soon as it is
reduced, while later segments are still in flight.

The two halves are entry points of their own: `reduce_scatter` leaves rank r with the full sum
of its own chunk `owned_span(n, r, P)` (chunk (r + 1) % P of P near-equal chunks), and
`all_gather` fills every chunk from its owner, so `all_gather(reduce_scatter(x))` is the
all-reduce. Host memory only: the additions are NumPy's.
"""
import numpy as np

from ._p2p import DEFAULT_SEGMENT_BYTES, TAG, bounds, scratch_for, wait, waitall

HOST_ONLY = True


def owned_span(n, rank, size):
    """[lo, hi) of an n-element buffer that `rank` holds the sum of after reduce_scatter."""
    b = bounds(n, size)
    c = (rank + 1) % size
    return b[c], b[c + 1]


def _segments(b, c, seg):
    return [(lo, min(lo + seg, b[c + 1])) for lo in range(b[c], b[c + 1], seg)]


def reduce_scatter(buf, comm, segment_bytes=DEFAULT_SEGMENT_BYTES):
    """In place on a contiguous 1-D host buffer; returns this rank's owned_span, which then holds
    the sum over ranks (the rest of buf holds partial sums)."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return owned_span(buf.size, r, p)
    b = bounds(buf.size, p)
    seg = max(1, segment_bytes // buf.itemsize)
    right, left = (r + 1) % p, (r - 1) % p
    scratch = scratch_for(b[1] + (buf.size % p > 0), buf.dtype)
    # At step s rank r sends chunk r-s and receives chunk r-s-1, adding its own part; after
    # P-1 steps it holds the full sum of chunk r+1. Scratch segment j is re-posted for step
    # s+1 only after step s's segment j was added.
    sends = [comm.Isend(buf[lo:hi], right, TAG) for lo, hi in _segments(b, r, seg)]
    recv_segs = _segments(b, (r - 1) % p, seg)
    recvs = [comm.Irecv(scratch[lo - b[(r - 1) % p]:hi - b[(r - 1) % p]], left, TAG)
             for lo, hi in recv_segs]
    for s in range(p - 1):
        c = (r - s - 1) % p
        nxt = (r - s - 2) % p
        next_segs = _segments(b, nxt, seg) if s < p - 2 else []
        next_recvs = []
        for j, (lo, hi) in enumerate(recv_segs):
            wait(recvs[j])
            np.add(buf[lo:hi], scratch[lo - b[c]:hi - b[c]], out=buf[lo:hi])
            if s < p - 2:
                sends.append(comm.Isend(buf[lo:hi], right, TAG))
            if j < len(next_segs):
                # Scratch slot j is free again: post the next step's segment j into it.
                nlo, nhi = next_segs[j]
                next_recvs.append(comm.Irecv(scratch[nlo - b[nxt]:nhi - b[nxt]], left, TAG))
        for nlo, nhi in next_segs[len(recv_segs):]:
            next_recvs.append(comm.Irecv(scratch[nlo - b[nxt]:nhi - b[nxt]], left, TAG))
        recvs, recv_segs = next_recvs, next_segs
    waitall(sends)
    return owned_span(buf.size, r, p)


def all_gather(buf, comm, segment_bytes=DEFAULT_SEGMENT_BYTES):
    """In place: every rank's owned_span of buf (the other chunks are overwritten) reaches all
    ranks. Every chunk is received exactly once, straight into its place, so all receives are
    posted up front; each arriving segment is forwarded at once."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return buf
    b = bounds(buf.size, p)
    seg = max(1, segment_bytes // buf.itemsize)
    right, left = (r + 1) % p, (r - 1) % p
    order = [(r - s) % p for s in range(p - 1)]  # chunk received at step s
    plan = [_segments(b, c, seg) for c in order]
    recvs = [[comm.Irecv(buf[lo:hi], left, TAG) for lo, hi in segs] for segs in plan]
    sends = [comm.Isend(buf[lo:hi], right, TAG) for lo, hi in _segments(b, (r + 1) % p, seg)]
    for s in range(p - 1):
        for j, (lo, hi) in enumerate(plan[s]):
            wait(recvs[s][j])
            if s < p - 2:
                sends.append(comm.Isend(buf[lo:hi], right, TAG))
    waitall(sends)
    return buf


def allreduce(buf, comm, segment_bytes=DEFAULT_SEGMENT_BYTES):
    """buf <- sum over ranks, in place (a contiguous 1-D host buffer)."""
    reduce_scatter(buf, comm, segment_bytes)
    return all_gather(buf, comm, segment_bytes)


def start(view, comm, blocking=False, segment_bytes=DEFAULT_SEGMENT_BYTES, **_):
    """A loop of point-to-point calls driven from Python: it runs to completion here."""
    allreduce(view, comm, segment_bytes)


def finish(handle):
    pass

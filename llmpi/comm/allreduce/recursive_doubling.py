"""Recursive doubling ("rd"): log2(P) exchanges of the whole buffer (latency-optimal); with a
non-power-of-two P the first 2*rem ranks pair up first so that a power of two remains. Host
memory only: the additions are NumPy's."""
import numpy as np

from ._p2p import DEFAULT_SEGMENT_BYTES, TAG, scratch_for, waitall

HOST_ONLY = True


def _exchange_add(buf, partner, lower_first, comm, scratch, seg):
    """buf <- buf + partner's buf, summed lower rank's data first on both sides."""
    if buf.size <= seg:  # one message each way: a single blocking call has the least overhead
        comm.Sendrecv(buf, partner, TAG, scratch[:buf.size], partner, TAG)
    else:
        reqs = [comm.Irecv(scratch[lo:lo + seg], partner, TAG) for lo in range(0, buf.size, seg)]
        reqs += [comm.Isend(buf[lo:lo + seg], partner, TAG) for lo in range(0, buf.size, seg)]
        waitall(reqs)
    if lower_first:
        np.add(buf, scratch[:buf.size], out=buf)
    else:
        np.add(scratch[:buf.size], buf, out=buf)


def allreduce(buf, comm, segment_bytes=DEFAULT_SEGMENT_BYTES):
    """buf <- sum over ranks, in place (a contiguous 1-D host buffer)."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return buf
    seg = max(1, segment_bytes // buf.itemsize)
    scratch = scratch_for(buf.size, buf.dtype)
    p2 = 1 << (p.bit_length() - 1)
    rem = p - p2
    # Fold: even rank 2i < 2*rem hands its data to 2i+1 and sits out until the end.
    if r < 2 * rem:
        if r % 2 == 0:
            waitall([comm.Isend(buf[lo:lo + seg], r + 1, TAG) for lo in range(0, buf.size, seg)])
            waitall([comm.Irecv(buf[lo:lo + seg], r + 1, TAG) for lo in range(0, buf.size, seg)])
            return buf
        waitall([comm.Irecv(scratch[lo:lo + seg], r - 1, TAG) for lo in range(0, buf.size, seg)])
        np.add(scratch, buf, out=buf)
        vr = r // 2
    else:
        vr = r - rem
    mask = 1
    while mask < p2:
        vpartner = vr ^ mask
        partner = vpartner * 2 + 1 if vpartner < rem else vpartner + rem
        _exchange_add(buf, partner, r < partner, comm, scratch, seg)
        mask <<= 1
    if r < 2 * rem:
        waitall([comm.Isend(buf[lo:lo + seg], r - 1, TAG) for lo in range(0, buf.size, seg)])
    return buf


def start(view, comm, blocking=False, segment_bytes=DEFAULT_SEGMENT_BYTES, **_):
    """A loop of point-to-point calls driven from Python: it runs to completion here."""
    allreduce(view, comm, segment_bytes)


def finish(handle):
    pass

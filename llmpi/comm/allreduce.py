"""Sum all-reduce of one contiguous 1-D buffer: MPI's, our ring, recursive doubling.

Every function takes `(buf, comm)`, works in place, is a no-op for one process and
leaves every rank with a bitwise identical result (each element is summed in one
fixed order, then copied), so data-parallel replicas never drift apart.

Algorithms (P ranks, n bytes):
- "mpi":  `MPI_Allreduce(IN_PLACE)`, the reference.
- "ring": reduce-scatter then all-gather around the ring, P-1 steps each; every rank
  sends 2(P-1)/P * n bytes (bandwidth-optimal). Each step's chunk is cut into
  segments of `segment_bytes` that are pipelined: segment j is forwarded to the
  next rank as soon as it is reduced, while later segments are still in flight.
- "rd":   recursive doubling, log2(P) exchanges of the whole buffer
  (latency-optimal); a non-power-of-two P folds the extra ranks in first.
- "auto": "rd" below AUTO_THRESHOLD_BYTES, "ring" from there on (measured with
  `mpiexec -n 4 python -m llmpi.bench allreduce` on a 2-core laptop-class VM).
- "nccl": NCCL's all-reduce on a CuPy buffer, device to device, ordered on the current
  CuPy stream. The NCCL communicator is made once per MPI communicator (its unique id is
  broadcast over MPI). NCCL needs one GPU per rank: ranks sharing a GPU cannot use it.

Device (CuPy) buffers: the stream is synchronised before MPI sees the buffer. "mpi" hands
it to MPI as it is when MPI is CUDA-aware (`cuda_aware_mpi`: detected with "auto", or
"yes"/"no"; llmpi.comm.device); otherwise, and always for "ring" and "rd" (which add with
NumPy), it is staged through page-locked host memory.
"""
import os
import time

import numpy as np
from mpi4py import MPI

from .. import backend
from ..errors import UserError
from .device import HostStage, device_direct

ALGORITHMS = ("mpi", "ring", "rd", "auto", "nccl")
DEFAULT_SEGMENT_BYTES = 1 << 20
# Below this many bytes recursive doubling's log2(P) exchanges beat the ring's 2(P-1)
# steps; above it the ring's smaller volume per rank (2(P-1)/P n vs log2(P) n) wins.
# Measured at P=4 on 2 shared cores: rd ahead at 256 KiB, even at 1 MiB, ring ahead
# from 4 MiB. The latency/bandwidth model puts the crossover at about
# alpha/beta * (2(P-1) - log2 P) / (log2 P - 2(P-1)/P), i.e. it grows with P.
AUTO_THRESHOLD_BYTES = 1 << 20
_TAG = 0x4C4C  # our point-to-point traffic; below 32767, the smallest MPI_TAG_UB allowed

_scratch = {}
_stage = HostStage()  # for the blocking allreduce_sum; an Allreducer keeps its own
# Waiting by Test + sched_yield instead of MPI's busy Wait hands the core to a rank
# that has work when ranks outnumber cores; with a core per rank it costs nothing.
YIELD_WHILE_WAITING = True


def _wait(req):
    if YIELD_WHILE_WAITING:
        while not req.Test():
            os.sched_yield()
    else:
        req.Wait()


def _waitall(reqs):
    if YIELD_WHILE_WAITING:
        while not MPI.Request.Testall(reqs):
            os.sched_yield()
    else:
        MPI.Request.Waitall(reqs)


def _scratch_for(n, dtype):
    """A receive buffer of at least n elements, allocated once per dtype and grown."""
    key = np.dtype(dtype).str
    buf = _scratch.get(key)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1), dtype=dtype)
        _scratch[key] = buf
    return buf[:n]


def _check(buf):
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        raise ValueError("all-reduce needs a contiguous 1-D array")
    if buf.dtype not in (np.float32, np.float64):
        raise ValueError(f"all-reduce supports float32/float64, got {buf.dtype}")


NCCL_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
_nccl_comms = {}  # id(MPI comm) -> (MPI comm, NCCL communicator); the MPI comm is kept alive


def _nccl_module():
    try:
        from cupy.cuda import nccl
    except ImportError:
        nccl = None
    if nccl is None or not getattr(nccl, "available", True):
        raise UserError("allreduce 'nccl' needs CuPy with NCCL (pip install cupy-cuda12x and the NCCL "
                        "library); use allreduce 'mpi' instead")
    return nccl


def nccl_communicator(comm):
    """The NCCL communicator spanning the ranks of `comm` (collective on first use, then cached).
    Rank 0's unique id travels as an int array with an upper-case Bcast (no pickle)."""
    entry = _nccl_comms.get(id(comm))
    if entry is not None:
        return entry[1]
    nccl = _nccl_module()
    # CuPy < 13 gives the id as a tuple of 128 signed chars, later CuPy as 128 bytes; the last
    # element says which, so every rank rebuilds the type its CuPy expects
    wire = np.zeros(NCCL_ID_BYTES + 1, dtype=np.int64)
    if comm.Get_rank() == 0:
        uid = nccl.get_unique_id()
        is_bytes = isinstance(uid, (bytes, bytearray))
        wire[:NCCL_ID_BYTES] = np.frombuffer(bytes(uid), np.int8) if is_bytes else np.asarray(uid)
        wire[-1] = is_bytes
    comm.Bcast(wire, root=0)
    ids = wire[:NCCL_ID_BYTES]
    uid = ids.astype(np.int8).tobytes() if wire[-1] else tuple(int(c) for c in ids)
    nc = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
    _nccl_comms[id(comm)] = (comm, nc)
    return nc


def nccl_allreduce(buf, comm, synchronize=True):
    """buf <- sum over ranks, in place on a contiguous CuPy float32/float64 buffer, queued on the
    current stream; synchronize=False leaves the wait to the caller (the overlap path)."""
    if not backend.is_device_array(buf):
        raise UserError("allreduce 'nccl' works on GPU buffers only (--device gpu)")
    nccl = _nccl_module()
    kind = nccl.NCCL_FLOAT32 if buf.dtype == np.float32 else nccl.NCCL_FLOAT64
    stream = backend.array_module(buf).cuda.get_current_stream()
    nccl_communicator(comm).allReduce(buf.data.ptr, buf.data.ptr, buf.size, kind, nccl.NCCL_SUM,
                                      stream.ptr)
    if synchronize:
        stream.synchronize()
    return buf


def allreduce_sum(buf, comm, algorithm="mpi", segment_bytes=DEFAULT_SEGMENT_BYTES, cuda_aware_mpi="auto"):
    """buf <- sum over ranks of buf, in place, on every rank of comm."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    _check(buf)
    if comm.Get_size() == 1 or buf.size == 0:
        return buf
    if algorithm == "nccl":
        return nccl_allreduce(buf, comm)
    if backend.is_device_array(buf):
        backend.synchronize(buf)
        # Our ring and rd add with NumPy on host memory, so they always stage.
        if algorithm != "mpi" or not device_direct(cuda_aware_mpi):
            host = _stage.download(buf)
            allreduce_sum(host, comm, algorithm, segment_bytes)
            _stage.upload(host, buf)
            return buf
    if algorithm == "auto":
        algorithm = "rd" if buf.nbytes < AUTO_THRESHOLD_BYTES else "ring"
    if algorithm == "mpi":
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    elif algorithm == "ring":
        ring_allreduce(buf, comm, segment_bytes)
    else:
        recursive_doubling_allreduce(buf, comm, segment_bytes)
    return buf


def _bounds(n, p):
    """Chunk c is [b[c], b[c+1]); sizes differ by at most one, some may be empty."""
    return [(c * n) // p for c in range(p + 1)]


def ring_allreduce(buf, comm, segment_bytes=DEFAULT_SEGMENT_BYTES):
    """Pipelined ring all-reduce (reduce-scatter + all-gather) of a host buffer."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return buf
    b = _bounds(buf.size, p)
    seg = max(1, segment_bytes // buf.itemsize)
    right, left = (r + 1) % p, (r - 1) % p
    scratch = _scratch_for(b[1] + (buf.size % p > 0), buf.dtype)

    def segments(c):
        return [(lo, min(lo + seg, b[c + 1])) for lo in range(b[c], b[c + 1], seg)]

    # Reduce-scatter: at step s rank r sends chunk r-s and receives chunk r-s-1, adding
    # its own part; after P-1 steps it holds the full sum of chunk r+1. Scratch
    # segment j is re-posted for step s+1 only after step s's segment j was added.
    sends = [comm.Isend(buf[lo:hi], right, _TAG) for lo, hi in segments(r)]
    recv_segs = segments((r - 1) % p)
    recvs = [comm.Irecv(scratch[lo - b[(r - 1) % p]:hi - b[(r - 1) % p]], left, _TAG)
             for lo, hi in recv_segs]
    for s in range(p - 1):
        c = (r - s - 1) % p
        nxt = (r - s - 2) % p
        next_segs = segments(nxt) if s < p - 2 else []
        next_recvs = []
        for j, (lo, hi) in enumerate(recv_segs):
            _wait(recvs[j])
            np.add(buf[lo:hi], scratch[lo - b[c]:hi - b[c]], out=buf[lo:hi])
            if s < p - 2:
                sends.append(comm.Isend(buf[lo:hi], right, _TAG))
            if j < len(next_segs):
                # Scratch slot j is free again: post the next step's segment j into it.
                nlo, nhi = next_segs[j]
                next_recvs.append(comm.Irecv(scratch[nlo - b[nxt]:nhi - b[nxt]], left, _TAG))
        for nlo, nhi in next_segs[len(recv_segs):]:
            next_recvs.append(comm.Irecv(scratch[nlo - b[nxt]:nhi - b[nxt]], left, _TAG))
        recvs, recv_segs = next_recvs, next_segs
    _waitall(sends)

    # All-gather: every chunk is received exactly once, straight into its place, so all
    # receives are posted up front; each arriving segment is forwarded at once.
    order = [(r - s) % p for s in range(p - 1)]  # chunk received at step s
    plan = [segments(c) for c in order]
    recvs = [[comm.Irecv(buf[lo:hi], left, _TAG) for lo, hi in segs] for segs in plan]
    sends = [comm.Isend(buf[lo:hi], right, _TAG) for lo, hi in segments((r + 1) % p)]
    for s in range(p - 1):
        for j, (lo, hi) in enumerate(plan[s]):
            _wait(recvs[s][j])
            if s < p - 2:
                sends.append(comm.Isend(buf[lo:hi], right, _TAG))
    _waitall(sends)
    return buf


def _exchange_add(buf, partner, lower_first, comm, scratch, seg):
    """buf <- buf + partner's buf, summed lower rank's data first on both sides."""
    if buf.size <= seg:  # one message each way: a single blocking call has the least overhead
        comm.Sendrecv(buf, partner, _TAG, scratch[:buf.size], partner, _TAG)
    else:
        _exchange_segments(buf, partner, comm, scratch, seg)
    if lower_first:
        np.add(buf, scratch[:buf.size], out=buf)
    else:
        np.add(scratch[:buf.size], buf, out=buf)


def _exchange_segments(buf, partner, comm, scratch, seg):
    reqs = [comm.Irecv(scratch[lo:lo + seg], partner, _TAG) for lo in range(0, buf.size, seg)]
    reqs += [comm.Isend(buf[lo:lo + seg], partner, _TAG) for lo in range(0, buf.size, seg)]
    _waitall(reqs)


def recursive_doubling_allreduce(buf, comm, segment_bytes=DEFAULT_SEGMENT_BYTES):
    """Recursive doubling; the first 2*rem ranks pair up so a power of two remains."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return buf
    seg = max(1, segment_bytes // buf.itemsize)
    scratch = _scratch_for(buf.size, buf.dtype)
    p2 = 1 << (p.bit_length() - 1)
    rem = p - p2
    # Fold: even rank 2i < 2*rem hands its data to 2i+1 and sits out until the end.
    if r < 2 * rem:
        if r % 2 == 0:
            _waitall([comm.Isend(buf[lo:lo + seg], r + 1, _TAG) for lo in range(0, buf.size, seg)])
            _waitall([comm.Irecv(buf[lo:lo + seg], r + 1, _TAG) for lo in range(0, buf.size, seg)])
            return buf
        _waitall([comm.Irecv(scratch[lo:lo + seg], r - 1, _TAG) for lo in range(0, buf.size, seg)])
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
        _waitall([comm.Isend(buf[lo:lo + seg], r - 1, _TAG) for lo in range(0, buf.size, seg)])
    return buf


class Allreducer:
    """The trainer's gradient all-reduce: whole buffer, buckets, or overlapped spans.

    - `reduce(buf)`: one call for the buffer, or one per contiguous bucket of
      `bucket_bytes` (0 = one bucket).
    - overlap: `start(buf, lo, hi)` as each span's gradients become final, then
      `wait_all()`. Spans that touch the pending one are merged until the bucket
      reaches `bucket_bytes`. "mpi" posts `MPI_Iallreduce` and returns at once; the
      other algorithms are point-to-point loops driven from Python, so they run
      blocking inside `start` (the overlap then only batches the work); "nccl" queues
      each bucket on the CuPy stream and `wait_all` synchronizes it once.
    - `comm_seconds`: wall time spent inside communication calls, accumulated.
    """

    def __init__(self, comm, algorithm="mpi", bucket_bytes=0, overlap=False,
                 segment_bytes=DEFAULT_SEGMENT_BYTES, cuda_aware_mpi="auto"):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; choose one of {ALGORITHMS}")
        self.comm, self.algorithm, self.overlap = comm, algorithm, overlap
        self.bucket_bytes, self.segment_bytes = int(bucket_bytes), segment_bytes
        self.cuda_aware_mpi = cuda_aware_mpi
        self.device_direct = device_direct(cuda_aware_mpi)
        if algorithm == "nccl" and comm.Get_size() > 1:
            nccl_communicator(comm)  # fail early, and collectively, rather than mid-step
        self.comm_seconds = 0.0
        self._requests = []
        self._stage = HostStage()  # bucket [lo, hi) stages at offset lo, so buckets never overlap
        self._staged = []  # (device buffer, host copy) pairs to copy back after wait
        self._pending = None  # (buf, lo, hi) span not yet launched
        self._nccl_pending = False  # NCCL work queued on the stream since the last wait_all

    def _buckets(self, lo, hi, itemsize):
        step = max(1, self.bucket_bytes // itemsize) if self.bucket_bytes > 0 else hi - lo
        return [(a, min(a + step, hi)) for a in range(lo, hi, max(step, 1))]

    def reduce(self, buf):
        t0 = time.perf_counter()
        for lo, hi in self._buckets(0, buf.size, buf.itemsize):
            allreduce_sum(buf[lo:hi], self.comm, self.algorithm, self.segment_bytes, self.cuda_aware_mpi)
        self.comm_seconds += time.perf_counter() - t0
        return buf

    def start(self, buf, lo, hi):
        """Begin reducing buf[lo:hi] (its gradients are final); see the class doc."""
        if not self.overlap:
            raise RuntimeError("Allreducer.start needs overlap=True")
        pend = self._pending
        if pend is not None and pend[0] is buf and (hi == pend[1] or lo == pend[2]):
            lo, hi = min(lo, pend[1]), max(hi, pend[2])
        elif pend is not None:
            self._launch(*pend)
        self._pending = (buf, lo, hi)
        if (hi - lo) * buf.itemsize >= self.bucket_bytes:
            self._launch(buf, lo, hi)
            self._pending = None

    def _launch(self, buf, lo, hi):
        t0 = time.perf_counter()
        if self.comm.Get_size() > 1 and hi > lo:
            view = buf[lo:hi]
            if self.algorithm == "nccl":
                nccl_allreduce(view, self.comm, synchronize=False)
                self._nccl_pending = True
            elif self.algorithm != "mpi":
                allreduce_sum(view, self.comm, self.algorithm, self.segment_bytes, self.cuda_aware_mpi)
            elif backend.is_device_array(view) and not self.device_direct:
                backend.synchronize(view)
                host = self._stage.download(view, offset=lo)
                self._requests.append(self.comm.Iallreduce(MPI.IN_PLACE, host, op=MPI.SUM))
                self._staged.append((view, host))
            else:
                backend.synchronize(view)
                self._requests.append(self.comm.Iallreduce(MPI.IN_PLACE, view, op=MPI.SUM))
        self.comm_seconds += time.perf_counter() - t0

    def wait_all(self):
        """Finish every started reduction (flushing a partly filled bucket)."""
        if self._pending is not None:
            self._launch(*self._pending)
            self._pending = None
        t0 = time.perf_counter()
        MPI.Request.Waitall(self._requests)
        if self._nccl_pending:
            backend.synchronize()  # NCCL ran on the current stream of the selected device
            self._nccl_pending = False
        for view, host in self._staged:
            self._stage.upload(host, view)
        self._requests, self._staged = [], []
        self.comm_seconds += time.perf_counter() - t0

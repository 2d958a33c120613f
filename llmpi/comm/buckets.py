"""The trainer's gradient all-reduce: the whole buffer, contiguous buckets, or spans overlapped
with backward, over any registered algorithm (llmpi.comm.allreduce).

- `reduce(buf)`: one blocking all-reduce for the buffer, or one per contiguous bucket of
  `bucket_bytes` (0 = one bucket).
- overlap: `start(buf, lo, hi)` as each span's gradients become final, then `wait_all()`.
  Spans that touch the pending one are merged until the bucket reaches `bucket_bytes`. "mpi"
  posts MPI_Iallreduce and returns at once; "ring", "rd" and "auto" are point-to-point loops
  driven from Python, so they run to completion inside `start` (the overlap then only batches
  the work); "nccl" runs each bucket on NCCL's own stream, beside the backward kernels queued
  after it, and `wait_all` makes the compute stream wait for them on the device (its
  comm_seconds are then the host's calls only; the GPU's overlap shows in the step time).
- `comm_seconds`: wall time spent inside communication calls, accumulated.
"""
import time

from .allreduce import DEFAULT_SEGMENT_BYTES, check, get
from .allreduce.staged import Staging


class Allreducer:
    def __init__(self, comm, algorithm="mpi", bucket_bytes=0, overlap=False,
                 segment_bytes=DEFAULT_SEGMENT_BYTES, cuda_aware_mpi="auto"):
        self.comm, self.algorithm, self.overlap = comm, get(algorithm), overlap
        self.bucket_bytes, self.segment_bytes = int(bucket_bytes), segment_bytes
        self.staging = Staging(cuda_aware_mpi)  # bucket [lo, hi) stages at offset lo
        if comm.Get_size() > 1 and hasattr(self.algorithm, "prepare"):
            self.algorithm.prepare(comm)  # fail early, and collectively, rather than mid-step
        self.comm_seconds = 0.0
        self._handles = []  # started, not yet finished
        self._pending = None  # (buf, lo, hi) span not yet launched

    def _buckets(self, lo, hi, itemsize):
        step = max(1, self.bucket_bytes // itemsize) if self.bucket_bytes > 0 else hi - lo
        return [(a, min(a + step, hi)) for a in range(lo, hi, max(step, 1))]

    def reduce(self, buf):
        t0 = time.perf_counter()
        check(buf)
        if self.comm.Get_size() > 1:
            for lo, hi in self._buckets(0, buf.size, buf.itemsize):
                self.staging.finish(self.staging.start(self.algorithm, buf[lo:hi], self.comm, blocking=True,
                                                       segment_bytes=self.segment_bytes))
        self.comm_seconds += time.perf_counter() - t0
        return buf

    def start(self, buf, lo, hi):
        """Begin reducing buf[lo:hi] (its gradients are final); see the module doc."""
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
            self._handles.append(self.staging.start(self.algorithm, buf[lo:hi], self.comm, blocking=False,
                                                    offset=lo, segment_bytes=self.segment_bytes))
        self.comm_seconds += time.perf_counter() - t0

    def wait_all(self):
        """Finish every started reduction (flushing a partly filled bucket)."""
        if self._pending is not None:
            self._launch(*self._pending)
            self._pending = None
        t0 = time.perf_counter()
        for handle in self._handles:
            self.staging.finish(handle)
        self._handles = []
        self.comm_seconds += time.perf_counter() - t0

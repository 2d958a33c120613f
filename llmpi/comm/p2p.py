"""Point-to-point messages between pipeline stages: activations forward, their gradients back.

Everything is non-blocking (Isend/Irecv) and every receive is posted before the data is needed,
so no schedule deadlocks whatever the message size: two neighbours that both sent with a
blocking Send would wait for each other once a message passes MPI's eager limit (tens of KiB
in MPICH), since a large Send returns only when the receive is posted. Device buffers are staged
through page-locked host memory unless MPI is CUDA-aware (llmpi.comm.device), as the
all-reduce does.

Tags keep directions and micro-batches apart: 2 * micro_batch + (0 forward, 1 backward).
"""
import numpy as np

from .. import backend

FORWARD, BACKWARD = 0, 1


def tag(micro_batch, direction):
    return 2 * micro_batch + direction


class Channel:
    """Messages of one stage to and from its neighbours in the pipeline communicator.

    `post_recv(buf, source, tag)` and `send(buf, dest, tag)` return at once; `wait(handle)`
    completes one (copying a staged receive into its device buffer); `wait_sends()` completes
    every send, after which their buffers may be reused. `waiting` accumulates the seconds spent
    blocked in wait(), the pipeline's idle time.
    """

    def __init__(self, comm, clock, device_direct=False):
        self.comm, self.clock, self.device_direct = comm, clock, device_direct
        self.waiting = 0.0
        self._sends = []

    def post_recv(self, buf, source, tag):
        host = self._host_copy(buf, fill=False)
        return self.comm.Irecv(host, source, tag), host, buf

    def send(self, buf, dest, tag):
        host = self._host_copy(buf, fill=True)
        self._sends.append((self.comm.Isend(host, dest, tag), host))

    def wait(self, handle):
        request, host, buf = handle
        t0 = self.clock()
        request.Wait()
        self.waiting += self.clock() - t0
        if host is not buf:
            backend.copy_to_device(host, buf)
        return buf

    def wait_sends(self):
        t0 = self.clock()
        for request, _ in self._sends:
            request.Wait()
        self.waiting += self.clock() - t0
        self._sends = []

    def _host_copy(self, buf, fill):
        """buf itself on the host or for a CUDA-aware MPI; otherwise a pinned copy of its own
        (several messages are in flight at once, so each gets fresh memory, not a shared mirror)."""
        if not backend.is_device_array(buf):
            return buf
        backend.synchronize(buf)
        if self.device_direct:
            return buf
        host = backend.pinned_empty(buf.size, buf.dtype).reshape(buf.shape)
        if fill:
            backend.copy_to_host(buf, host)
        return host


def exchange_add(buf, partner, comm, tag_=0x7FFF - 1):
    """buf <- buf + partner's buf, both ranks calling it with each other (a tied parameter's
    gradient summed between the first and the last stage). Addition is commutative in IEEE
    arithmetic, so both ranks end with the same bits."""
    host = buf
    if backend.is_device_array(buf):
        backend.synchronize(buf)
        host = backend.pinned_empty(buf.size, buf.dtype).reshape(buf.shape)
        backend.copy_to_host(buf, host)
    other = np.empty_like(host)
    comm.Sendrecv(host, partner, tag_, other, partner, tag_)
    host += other
    if host is not buf:
        backend.copy_to_device(host, buf)
    return buf

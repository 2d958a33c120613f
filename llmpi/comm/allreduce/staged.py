"""Device buffers for the algorithms that add on the host: staged through page-locked memory.

`ring`, `rd` and `auto` add with NumPy, and `mpi` needs host memory unless MPI is CUDA-aware
(`parallel.cuda_aware_mpi`: detected with "auto", or "yes"/"no"; llmpi.comm.device). For those
a device buffer is synchronised, copied into a pinned host mirror, reduced there and copied back
at finish; each start stages at its view's offset in the mirror, so buckets in flight never
share host memory. Host buffers and NCCL pass straight through.
"""
from ... import backend
from ..device import HostStage, device_direct


class Staging:
    def __init__(self, cuda_aware_mpi="auto"):
        self.stage = HostStage()
        self.device_direct = device_direct(cuda_aware_mpi)

    def start(self, algorithm, view, comm, blocking=False, offset=0, **options):
        """algorithm.start on `view` or on its host copy -> a handle for finish()."""
        on_stream = getattr(algorithm, "ON_STREAM", False)
        on_device = backend.is_device_array(view)
        if on_device and not on_stream:
            backend.synchronize(view)  # MPI must see the finished kernels' results
        direct = on_stream or not (algorithm.HOST_ONLY or not self.device_direct)
        if not on_device or direct:
            return algorithm, algorithm.start(view, comm, blocking, **options), None, None
        host = self.stage.download(view, offset)
        return algorithm, algorithm.start(host, comm, blocking, **options), host, view

    def finish(self, handle):
        algorithm, inner, host, view = handle
        algorithm.finish(inner)
        if host is not None:
            self.stage.upload(host, view)

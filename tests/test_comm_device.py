"""Device buffers in communication (llmpi.comm.device), checked without a GPU.

`FakeDeviceArray` stands in for a CuPy array: llmpi.backend takes it for device memory (its
type's module name starts with "cupy") and it has no buffer interface, so MPI cannot read
it: every all-reduce and RMA call below works only if the data really went through the
host staging, and the bucketed non-blocking path only if each bucket had its own stage.
The NCCL path runs on a stand-in cupy.cuda.nccl that sums over MPI (the unique-id exchange
and the call into NCCL across ranks). The real device copies are covered by
tests/test_gpu_train.py on a GPU.
"""
import types

import numpy as np
import pytest
from mpi4py import MPI

from llmpi import backend
from llmpi.comm import device
from llmpi.comm.allreduce import allreduce_sum
from llmpi.comm.buckets import Allreducer
from llmpi.comm.rma import ShardedWindow
from llmpi.comm.world import world
from mpi_helpers import agreed, first_ranks


class FakeDeviceArray:
    """A 1-D array in "device memory": reachable only through get(out=) and set()."""

    __module__ = "cupy_stand_in"

    def __init__(self, data):
        self._data = data

    def __getattr__(self, name):
        if name in ("dtype", "size", "shape", "ndim", "itemsize", "nbytes", "flags"):
            return getattr(self._data, name)
        raise AttributeError(name)

    def __getitem__(self, key):
        return FakeDeviceArray(self._data[key])

    def get(self, out):
        np.copyto(out, self._data)

    def set(self, host):
        np.copyto(self._data, host)


@pytest.fixture
def fake_gpu(monkeypatch):
    stream = types.SimpleNamespace(synchronize=lambda: None, ptr=0)
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=lambda: stream))
    monkeypatch.setattr(backend, "array_module", lambda a: fake_cupy if backend.is_device_array(a) else np)
    monkeypatch.setattr(backend, "pinned_empty", lambda n, dtype: np.empty(n, dtype=dtype))  # needs CuPy


def rank_data(n, rank):
    return np.arange(n, dtype=np.float64) * (rank + 1)


def expected_sum(n, p):
    return np.arange(n, dtype=np.float64) * (p * (p + 1) // 2)


# ids: pytest-mpi would read an id "mpi" as its marker and skip the case without --with-mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring", "rd"], ids=["MPI_Allreduce", "ring", "rd"])
def test_blocking_allreduce_stages_device_buffers(fake_gpu, algorithm):
    comm = world()
    host = rank_data(1001, comm.Get_rank())
    allreduce_sum(FakeDeviceArray(host), comm, algorithm, segment_bytes=512, cuda_aware_mpi="no")
    assert agreed(np.array_equal(host, expected_sum(1001, comm.Get_size())), comm)


def test_overlapped_buckets_stage_into_disjoint_host_memory(fake_gpu):
    """Several MPI_Iallreduce buckets in flight at once, each from its own slice of the stage."""
    comm = world()
    host = rank_data(1000, comm.Get_rank())
    grad = FakeDeviceArray(host)
    reducer = Allreducer(comm, "mpi", bucket_bytes=800, overlap=True, cuda_aware_mpi="no")
    for lo in range(900, -1, -100):  # backward finishes the last layers first
        reducer.start(grad, lo, lo + 100)
    reducer.wait_all()
    assert agreed(np.array_equal(host, expected_sum(1000, comm.Get_size())), comm)


def test_rma_window_stages_device_vectors(fake_gpu):
    comm = world()
    p, n = comm.Get_size(), 777
    with ShardedWindow(comm, n, np.float64, segment_bytes=256) as w:
        if comm.Get_rank() == 0:
            w.put_all(FakeDeviceArray(np.ones(n)))
        comm.Barrier()
        w.accumulate(FakeDeviceArray(rank_data(n, comm.Get_rank())))
        comm.Barrier()
        out = np.zeros(n)
        w.get(FakeDeviceArray(out))
        ok = np.array_equal(out, 1 + expected_sum(n, p))
        comm.Barrier()  # every get is done before the window is freed
    assert agreed(ok, comm)


def test_host_stage_reuses_and_grows_its_mirror():
    stage = device.HostStage()
    a = stage.download(np.arange(5.0), offset=3)
    assert a.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    first = stage.mirror(8, np.float64, pinned=False)  # host arrays stage through plain memory
    assert stage.mirror(4, np.float64, pinned=False) is first  # no new allocation while it fits
    assert stage.mirror(9, np.float64, pinned=False).size == 9
    out = np.zeros(5)
    stage.upload(a, out)
    assert out.tolist() == a.tolist()


def test_cuda_aware_setting():
    supported, why = device.mpi_cuda_support()
    assert supported in (True, False, None) and why
    assert device.device_direct("yes") and not device.device_direct("no")
    assert device.device_direct("auto") == bool(supported)
    with pytest.raises(ValueError, match="cuda_aware_mpi"):
        device.device_direct("maybe")
    line = device.describe("sync", "mpi", "no")
    assert line.startswith("staged through pinned host buffers")
    assert device.describe("sync", "ring", "yes").startswith("staged")  # the ring adds on the host
    assert device.describe("sync", "mpi", "yes").startswith("MPI on device memory")
    assert "NCCL" in device.describe("sync", "nccl", "auto")
    assert "RMA" in device.describe("async", "mpi", "auto")


def test_mpi_cannot_read_the_stand_in():
    """The premise of the tests above: handing the stand-in to MPI directly fails."""
    with pytest.raises((TypeError, ValueError, BufferError)):
        MPI.COMM_SELF.Allreduce(MPI.IN_PLACE, FakeDeviceArray(np.ones(3)), op=MPI.SUM)


@pytest.mark.skipif(not backend.gpu_available(), reason="no GPU")
def test_host_stage_round_trip_through_pinned_memory_on_the_gpu():
    import cupy
    stage = device.HostStage()
    dev = cupy.arange(1000, dtype=cupy.float32)
    host = stage.download(dev[100:], offset=100)
    assert host.tolist() == list(range(100, 1000))
    # page-locked memory is registered with CUDA: it has a host pointer (NULL for pageable memory),
    # and its type (the field is `type` in CuPy 14, `memoryType` in old CuPy, absent in between)
    # is cudaMemoryTypeHost = 1
    attrs = cupy.cuda.runtime.pointerGetAttributes(host.ctypes.data)
    assert attrs.hostPointer != 0
    assert getattr(attrs, "type", getattr(attrs, "memoryType", 1)) == 1
    host *= 2
    stage.upload(host, dev[100:])
    assert cupy.asnumpy(dev).tolist() == list(range(100)) + [2 * i for i in range(100, 1000)]


class StandInNccl:
    """cupy.cuda.nccl for ranks without GPUs: a communicator is built from (size, unique id,
    rank) as NCCL's is, and its allReduce sums over MPI the FakeDeviceArray whose address it
    gets. Each rank draws its own id: only rank 0's may reach NcclCommunicator."""

    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0

    def __init__(self, comm, id_as_bytes):
        self.comm, self.id_as_bytes = comm, id_as_bytes
        self.buffers = {}  # address -> FakeDeviceArray
        self.built = []  # (size, uid, rank) of each NcclCommunicator

    @staticmethod
    def id_bytes(rank):
        return np.random.default_rng(1000 + rank).integers(-128, 128, 128, dtype=np.int8).tobytes()

    def get_unique_id(self):
        raw = self.id_bytes(self.comm.Get_rank())
        return raw if self.id_as_bytes else tuple(np.frombuffer(raw, np.int8).tolist())

    def NcclCommunicator(self, size, uid, rank):  # noqa: N802 (CuPy's name)
        self.built.append((size, uid, rank))
        nccl = self

        class Communicator:
            def allReduce(self, send, recv, count, datatype, op, stream):  # noqa: N802
                assert send == recv and op == nccl.NCCL_SUM
                data = nccl.buffers[recv]._data
                assert count == data.size and datatype == {np.float32: nccl.NCCL_FLOAT32,
                                                           np.float64: nccl.NCCL_FLOAT64}[data.dtype.type]
                nccl.comm.Allreduce(MPI.IN_PLACE, data, op=MPI.SUM)

        return Communicator()


@pytest.mark.parametrize("id_as_bytes", [True, False], ids=["cupy13_bytes_id", "old_cupy_tuple_id"])
def test_nccl_allreduce_builds_one_communicator_from_rank0s_id(fake_gpu, monkeypatch, id_as_bytes):
    from llmpi.gpu import nccl as gpu_nccl
    comm = world().Dup()  # a communicator of its own: the NCCL one is cached per MPI communicator
    nccl = StandInNccl(comm, id_as_bytes)
    monkeypatch.setattr(gpu_nccl, "module", lambda: nccl)
    host = rank_data(300, comm.Get_rank()).astype(np.float32)
    buf = FakeDeviceArray(host)
    buf.data = types.SimpleNamespace(ptr=12345)
    nccl.buffers[12345] = buf
    for _ in range(2):
        allreduce_sum(buf, comm, "nccl")
    p = comm.Get_size()
    ok = np.array_equal(host, expected_sum(300, p) * p)  # twice: every rank held the sum before the second
    ok &= len(nccl.built) == (1 if p > 1 else 0)  # built once, on first use; one process needs none
    for size, uid, rank in nccl.built:
        ok &= size == p and rank == comm.Get_rank() and type(uid) is (bytes if id_as_bytes else tuple)
        ok &= (uid if id_as_bytes else np.asarray(uid, np.int8).tobytes()) == StandInNccl.id_bytes(0)
    gpu_nccl.forget(comm)
    comm.Free()
    assert agreed(ok, world())


def test_pipeline_messages_and_the_tied_sum_stage_device_buffers(fake_gpu):
    """Stage-to-stage activations (llmpi.comm.p2p.Channel) and the tied wte gradient sum go through
    host copies when MPI is not CUDA-aware, so GPU pipelines work with any MPI."""
    import time

    from llmpi.comm.p2p import Channel, exchange_add
    comm = world()
    if comm.Get_size() < 2:
        pytest.skip("needs 2 ranks")
    sub = first_ranks(comm, 2)
    ok = True
    if sub != MPI.COMM_NULL:
        r = sub.Get_rank()
        channel = Channel(sub, time.perf_counter, device_direct=False)
        mine = FakeDeviceArray(rank_data(3000, r))
        got = np.zeros(3000)
        handle = channel.post_recv(FakeDeviceArray(got), 1 - r, 5)
        channel.send(mine, 1 - r, 5)
        channel.wait(handle)
        channel.wait_sends()
        ok = np.array_equal(got, rank_data(3000, 1 - r))
        tied = rank_data(100, r)
        exchange_add(FakeDeviceArray(tied), 1 - r, sub)
        ok &= np.array_equal(tied, rank_data(100, 0) + rank_data(100, 1))
        sub.Free()
    assert agreed(ok, comm)

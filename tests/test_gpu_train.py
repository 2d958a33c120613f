"""Training on the GPU end to end: `mpirun -n 2 python -m llmpi.train --device gpu` with both
ranks sharing one GPU (gradients all-reduced through the host with "mpi" and our "ring"; async
RMA), and the "nccl" all-reduce. NCCL refuses two ranks on one device ("Duplicate GPU detected"), so on a
one-GPU machine "nccl" trains at one rank, and the NCCL call itself is checked directly on
a one-rank communicator. The no-GPU answers run everywhere.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from cli import REPO, clean_env, run, single_process_only
from llmpi.training import metrics
from llmpi.backend import gpu_available
from llmpi.comm.allreduce import nccl
from llmpi.errors import UserError

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no GPU")


def gpu_count():
    if not gpu_available():
        return 0
    import cupy
    return cupy.cuda.runtime.getDeviceCount()

TINY = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=2",
        "--set", "model.block_size=32", "--set", "train.batch_size=16", "--set", "train.max_iters=40",
        "--set", "train.log_interval=10", "--set", "train.eval_interval=0",
        "--set", "optim.lr=3e-3", "--set", "schedule.warmup_iters=5"]


def nccl_allreduce(buf, comm):
    """The registered NCCL algorithm, blocking, on any communicator (one rank included)."""
    nccl.finish(nccl.start(buf, comm, blocking=True))


def test_nccl_needs_a_device_buffer():
    with pytest.raises(UserError, match="GPU"):
        nccl_allreduce(np.zeros(3, np.float32), MPI.COMM_SELF)


@single_process_only
@pytest.mark.skipif(gpu_available(), reason="checks the answer without a GPU")
def test_gpu_bench_without_gpu_says_so():
    p = run(["-m", "llmpi.bench", "train", "--device", "gpu", "--json"], check=True)
    assert p.stdout.splitlines()[0] == "no GPU"
    assert json.loads(p.stdout.splitlines()[-1]) == {"skipped": "no GPU"}


@needs_gpu
def test_nccl_allreduce_one_rank():
    """The CuPy NCCL binding as we call it: id broadcast, communicator, in-place sum on the stream."""
    import cupy
    buf = cupy.arange(1000, dtype=cupy.float32)
    nccl_allreduce(buf, MPI.COMM_SELF)
    assert bool((buf == cupy.arange(1000, dtype=cupy.float32)).all())
    buf64 = cupy.ones(7, dtype=cupy.float64)
    nccl_allreduce(buf64, MPI.COMM_SELF)
    assert float(buf64.sum()) == 7.0


@needs_gpu
def test_nccl_overlapped_bucket_runs_on_its_own_stream_one_rank():
    """An overlapped bucket's sum is queued on NCCL's stream after the compute stream's work, and
    finish makes the compute stream wait for it (an event), without a host wait."""
    import cupy
    buf = cupy.zeros(1 << 20, dtype=cupy.float32)
    buf += 3.0  # queued on the compute stream before the sum: the event orders it first
    handle = nccl.start(buf, MPI.COMM_SELF, blocking=False)
    assert isinstance(handle, cupy.cuda.Event)
    nccl.finish(handle)
    buf *= 2.0  # queued after the wait
    assert float(buf.sum()) == 6.0 * buf.size


def launcher(np_):
    """Open MPI's mpirun (the GPU machines) needs root and oversubscription flags, and, in containers
    without ssh, the rsh launcher switched off for a one-node job; MPICH's needs none of that."""
    exe = shutil.which("mpirun") or shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    extra = ["--allow-run-as-root", "--oversubscribe", "--mca", "plm", "^rsh"] \
        if "Open MPI" in version or "OpenRTE" in version else []
    return [exe, *extra, "-n", str(np_)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus") / "tiny.h5")
    run(["-m", "llmpi.data", "prepare", "--input", os.path.join(REPO, "llmpi"), "--out", out, "--quiet"],
        check=True)
    return out


def train_on_gpu(tmp_path, corpus, np_, *extra):
    """Run the TINY job on the GPU with np_ ranks; its per-step losses."""
    cmd = [*launcher(np_), sys.executable, "-m", "llmpi.train", "--device", "gpu", *TINY,
           "--set", f"data.path={corpus}", *extra, "--run-name", "gpu"]
    p = subprocess.run(cmd, cwd=str(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "gpu:" in p.stdout, p.stdout  # the device line names the GPU
    loss = metrics.read(os.path.join(str(tmp_path), "runs", "gpu", "metrics.h5"))["steps"]["loss"]
    assert len(loss) > 0 and np.isfinite(loss).all()
    return loss


@needs_gpu
@single_process_only
@pytest.mark.parametrize("np_,algorithm,dtype", [(2, "mpi", "float32"), (1, "nccl", "float32"), (2, "mpi", "bf16"),
                                                 (2, "ring", "float32")],
                         ids=["2ranks-mpi", "1rank-nccl", "2ranks-mpi-bf16", "2ranks-ring"])
def test_training_on_gpu_lowers_the_loss(tmp_path, corpus, np_, algorithm, dtype):
    loss = train_on_gpu(tmp_path, corpus, np_, "--set", f"parallel.allreduce={algorithm}",
                        "--set", f"model.dtype={dtype}")
    assert len(loss) == 40
    assert loss[-10:].mean() < loss[:5].mean() - 0.25, loss  # a tiny, noisy job: a clear drop, not a target


@needs_gpu
@single_process_only
def test_async_rma_trains_with_device_parameters(tmp_path, corpus):
    """The RMA windows live in host memory: device parameters and deltas are staged."""
    train_on_gpu(tmp_path, corpus, 2, "--set", "parallel.mode=async")


@pytest.mark.skipif(gpu_count() < 2, reason="no GPU" if not gpu_available() else "needs two GPUs (NCCL refuses "
                    "two ranks on one device)")
@single_process_only
def test_nccl_buckets_overlapped_on_their_own_stream_give_the_blocking_sum(tmp_path, corpus):
    """Two ranks on two GPUs: buckets summed on NCCL's stream beside the backward (overlap) train
    exactly as one blocking NCCL all-reduce after it (two ranks: a + b in either order)."""
    for name in ("blocking", "overlap"):
        (tmp_path / name).mkdir()
    blocking = train_on_gpu(tmp_path / "blocking", corpus, 2, "--set", "parallel.allreduce=nccl")
    overlapped = train_on_gpu(tmp_path / "overlap", corpus, 2, "--set", "parallel.allreduce=nccl",
                              "--set", "parallel.overlap=true", "--set", "parallel.bucket_mb=0.05")
    assert np.array_equal(blocking, overlapped), (blocking[:5], overlapped[:5])

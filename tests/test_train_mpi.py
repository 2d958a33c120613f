"""The synchronous loop in-process on the MPI world of the test run (any size, 1 included).

Assertions come after the collectives and check the same gathered values on every
rank, so a failure cannot leave some ranks waiting.
"""
import os
import types

import numpy as np
import pytest
from mpi4py import MPI

from llmpi import config, data
from llmpi.errors import UserError
from llmpi.model.gpt import GPT
from llmpi.model.layers.gradnorm import clip_grad_norm
from llmpi.training import graphed, metrics, run as run_module
from llmpi.training.optim import make_optimizer, schedule_lr
from llmpi.training.run import Run
from llmpi.training.sync import train_sync

COMM = MPI.COMM_WORLD


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    """One directory for all ranks (rank 0's), holding a small prepared corpus."""
    path = str(tmp_path_factory.mktemp("shared")) if COMM.rank == 0 else None
    path = COMM.bcast(path, root=0)
    if COMM.rank == 0:
        data.prepare([data.tokenfile.__file__, config.__file__], "byte", 0.1, f"{path}/c.h5", progress=False)
    COMM.Barrier()
    return path


def make_run(shared_dir, name, *overrides):
    job = config.load_job(None, [
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16",
        "train.batch_size=10", "train.log_interval=100", "train.eval_iters=1", "schedule.warmup_iters=2",
        f"data.path={shared_dir}/c.h5", f"train.out_dir={shared_dir}/runs", f"train.run_name={name}",
        *overrides])
    return Run(job, types.SimpleNamespace(resume=False, overwrite=True), COMM)


@pytest.mark.parametrize("algorithm", ["mpi", "ring"], ids=["MPI_Allreduce", "ring"])
def test_parameters_are_bitwise_identical_on_every_rank(shared_dir, algorithm):
    run = make_run(shared_dir, f"ident-{algorithm}", "train.max_iters=5", f"parallel.allreduce={algorithm}")
    train_sync(run)
    digests = COMM.allgather(run.model.params.data.tobytes())
    assert all(d == digests[0] for d in digests)
    assert run.watchdog.timer.finished.is_set()  # disarmed: the armed timer would abort this process later


def test_a_loop_that_raises_still_disarms_the_watchdog():
    """The watchdog's timer calls MPI Abort when it fires: a loop run in-process (as these tests
    do) must disarm it however it ends, or the process dies minutes later."""
    import types

    from llmpi.training.signals import Watchdog, disarms_watchdog

    @disarms_watchdog
    def failing_loop(run):
        run.watchdog.step_done()  # armed, as after a first step
        raise RuntimeError("a step failed")
    run = types.SimpleNamespace(watchdog=Watchdog(COMM.rank, 600.0))
    with pytest.raises(RuntimeError, match="a step failed"):
        failing_loop(run)
    assert run.watchdog.timer.finished.is_set()


def test_uneven_shares_give_the_single_process_update(shared_dir):
    """Ranks take different numbers of samples; the weighted sum equals one process. In float64: in
    float32 the first AdamW step, g / (|g| + eps), turns the rounding of the tiniest gradients (whose
    order of additions differs between the ranks' partial sums and one batch) into visible moves."""
    P = COMM.size
    run = make_run(shared_dir, "uneven", "train.max_iters=1", "train.eval_interval=0", "model.dtype=float64")
    counts = [1 + r for r in range(P)]
    counts[-1] += 10 - sum(counts)
    if counts[-1] < 0:
        pytest.skip("world too large for a batch of 10")
    run.balancer.counts = counts
    reference = GPT(run.job.model, seed=run.job.train.seed)
    initial = reference.params.data.copy()
    train_sync(run)

    job = run.job
    starts = data.Sampler(len(run.tokens.train), job.model.block_size, job.train.seed).starts(0, 10)
    x, y = data.get_batch(run.tokens.train, starts, job.model.block_size)
    _, _, cache = reference.forward(x, y)
    reference.params.zero_grad()
    reference.backward(cache)
    clip_grad_norm(reference.params.grad, job.optim.grad_clip)
    make_optimizer(job.optim, reference.params).step(schedule_lr(job, 0))

    moved = np.abs(reference.params.data - initial).max()
    error = np.abs(run.model.params.data - reference.params.data).max()
    errors = COMM.allgather(float(error))
    assert moved > 1e-4
    assert max(errors) < 1e-10 * max(1.0, moved), errors


def _losses(run):
    COMM.Barrier()  # rank 0 wrote the log
    return metrics.read(os.path.join(run.run_dir, "metrics.h5"))["steps"]["loss"]


@pytest.mark.parametrize("micro", [0, 2], ids=["whole share", "micro-batches of 2"])
def test_graphed_step_equals_the_eager_step_in_float64(shared_dir, micro):
    """train.cuda_graph's step (static inputs per micro-batch size, the losses summed on the device,
    the clip's scale and AdamW's scalars read from an array) with its captures run as plain calls,
    against the eager loop on the same samples: bitwise in float64, at every world size."""
    overrides = ["train.max_iters=4", "train.eval_interval=0", "model.dtype=float64", "train.cpu_kernels=numpy",
                 f"train.micro_batch={micro}", "optim.grad_clip=0.05"]
    eager = make_run(shared_dir, f"eager-{micro}", *overrides)
    train_sync(eager)
    captured = make_run(shared_dir, f"graphed-{micro}", *overrides)
    captured.job.train.cuda_graph, captured.capture = True, graphed.eager  # config refuses it on the CPU
    train_sync(captured)
    same = COMM.allgather(bool(np.array_equal(captured.model.params.data, eager.model.params.data))
                          and bool(np.array_equal(captured.optimizer.v, eager.optimizer.v)))
    assert all(same), same
    assert np.array_equal(_losses(captured), _losses(eager))


def test_graphed_bf16_job_follows_the_eager_one(shared_dir, monkeypatch):
    """The job a GPU user runs (model.dtype = bf16, train.cuda_graph = true; the CPU computes bf16
    in float32) through the config and Run, with the capture as a plain call: within float32
    rounding of the eager run, a few ulps of the O(1) weights (the update's scalars are float32
    there, float64 on the host), while the steps moved the weights by over 1e-4."""
    overrides = ["train.max_iters=4", "train.eval_interval=0", "model.dtype=bf16", "train.cpu_kernels=numpy",
                 "train.device=auto", "optim.grad_clip=0.05"]
    eager = make_run(shared_dir, "bf16-eager", *overrides)
    train_sync(eager)
    monkeypatch.setattr(run_module, "graphs_for", lambda xp: graphed.eager)
    captured = make_run(shared_dir, "bf16-graphed", "train.cuda_graph=true", *overrides)
    train_sync(captured)
    diff = np.abs(captured.model.params.data - eager.model.params.data).max()
    moved = np.abs(eager.model.params.data - GPT(eager.job.model, seed=eager.job.train.seed).params.data).max()
    errors = COMM.allgather(float(diff))
    assert moved > 1e-4
    assert max(errors) < 1e-6 * max(1.0, float(np.abs(eager.model.params.data).max())), (errors, moved)
    assert np.allclose(_losses(captured), _losses(eager), rtol=1e-6)


@pytest.mark.parametrize("override,needed", [
    ("train.device=cpu", "train.device = 'gpu'"), ("model.dtype=float32", "model.dtype = 'bf16'"),
    ("parallel.mode=async", "parallel.mode = 'sync'"), ("parallel.overlap=true", "parallel.overlap = false"),
    ("parallel.zero=1", "parallel.zero = 0"), ("parallel.pipeline=2", "parallel.pipeline = 1"),
    ("optim.name=sgd", "optim.name = 'adamw'")])
def test_cuda_graph_refuses_what_it_does_not_capture(override, needed):
    """Each setting train.cuda_graph cannot capture is named in the one-line error."""
    base = ["train.cuda_graph=true", "train.device=gpu", "model.dtype=bf16"]
    config.load_job(None, base)  # (no GPU needed to validate)
    with pytest.raises(UserError, match=f"train.cuda_graph = true needs {needed}"):
        config.load_job(None, [*base, override])

"""parallel.mode = "local": the outer step by hand, one round against a hand-computed weighted
average of the replicas (in-process, at the size of the MPI run), H = 1 against synchronous SGD,
checkpoint and resume across a signal, 8 ranks, and bad inputs (as a user runs them)."""
import os
import types

import numpy as np
import pytest
from mpi4py import MPI

from cli import clean_env, single_process_only
from llmpi import compare, config, data
from llmpi.model.gpt import GPT
from llmpi.training.local_sgd import outer_step, train_local
from llmpi.training.optim import make_optimizer, schedule_lr
from llmpi.training.run import Run
from mpi_helpers import agreed
from test_train import corpus, steps, train  # noqa: F401  (corpus is a fixture)

COMM = MPI.COMM_WORLD


def test_outer_step_by_hand():
    anchor, delta = np.array([1.0, 2.0]), np.array([0.5, -0.25])
    plain = outer_step(anchor.copy(), delta, np.zeros(2), 1.0, 0.0)
    assert plain.tobytes() == (anchor + delta).tobytes()  # plain averaging, exactly
    w, u = anchor.copy(), np.zeros(2)
    outer_step(w, delta, u, 0.7, 0.9)  # g = -delta, u = g, w -= 0.7 (g + 0.9 u)
    np.testing.assert_allclose(w, anchor + 0.7 * 1.9 * delta)
    outer_step(w, delta, u, 0.7, 0.9)  # u = 0.9 g + g = 1.9 g, w -= 0.7 (g + 0.9 * 1.9 g)
    np.testing.assert_allclose(w, anchor + 0.7 * (1.9 + 1 + 0.9 * 1.9) * delta)


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("local")) if COMM.rank == 0 else None
    path = COMM.bcast(path, root=0)
    if COMM.rank == 0:
        data.prepare([data.tokenfile.__file__, config.__file__], "byte", 0.1, f"{path}/c.h5", progress=False)
    COMM.Barrier()
    return path


@pytest.mark.parametrize("outer_lr,outer_momentum", [(1.0, 0.0), (0.7, 0.9)], ids=["average", "nesterov"])
def test_one_round_is_the_weighted_average_of_the_replicas(shared_dir, outer_lr, outer_momentum):
    """H = 3 SGD steps per rank on its own share (uneven when P does not divide 10), then
    w0 + eta (1 + mu) sum_r (n_r / B) (w_r - w0): every rank recomputes every replica here."""
    P, H, B = COMM.size, 3, 10
    job = config.load_job(None, [
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", f"train.batch_size={B}",
        f"train.max_iters={H}", "train.log_interval=100", "train.eval_interval=0", "train.eval_iters=1",
        "optim.name=sgd", "optim.momentum=0.5", "optim.grad_clip=0", "optim.lr=0.3", f"data.path={shared_dir}/c.h5",
        f"train.out_dir={shared_dir}/runs", f"train.run_name=round-{outer_lr}", "parallel.mode=local",
        f"parallel.local_steps={H}", f"parallel.outer_lr={outer_lr}", f"parallel.outer_momentum={outer_momentum}"])
    run = Run(job, types.SimpleNamespace(resume=False, overwrite=True), COMM)
    train_local(run)
    w0 = GPT(job.model, seed=job.train.seed).params.data.copy()
    average = np.zeros_like(w0, dtype=np.float64)
    for r, (count, offset) in enumerate(zip(run.balancer.counts, run.balancer.offsets)):
        replica = GPT(job.model, seed=job.train.seed)
        optimizer = make_optimizer(job.optim, replica.params)
        sampler = data.Sampler(len(run.tokens.train), job.model.block_size, job.train.seed, r, P)
        for s in range(H):
            x, y = data.get_batch(run.tokens.train, sampler.starts(s, B, offset, count), job.model.block_size)
            replica.params.zero_grad()
            _, _, cache = replica.forward(x, y)
            replica.backward(cache)
            optimizer.step(schedule_lr(job, s))
        average += count / B * (replica.params.data - w0)
    expected = w0 + outer_lr * (1 + outer_momentum) * average
    error = float(np.abs(run.model.params.data - expected).max())
    moved = float(np.abs(expected - w0).max())
    assert agreed(moved > 1e-3 and error < 1e-5 * max(1.0, moved), COMM), (error, moved)


SGD = ["--set", "optim.name=sgd", "--set", "optim.momentum=0.9", "--set", "optim.grad_clip=0",
       "--set", "optim.lr=0.3"]


@single_process_only
def test_one_local_step_is_the_synchronous_step(tmp_path, corpus):  # noqa: F811
    """H = 1 with SGD (momentum is linear too) and no clipping, 3 ranks with shares 3, 3, 2."""
    train(tmp_path, corpus, *SGD, np=3, name="sync")
    train(tmp_path, corpus, *SGD, "--set", "parallel.mode=local", "--set", "parallel.local_steps=1", np=3,
          name="local")
    a, b = steps(tmp_path, "sync"), steps(tmp_path, "local")
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
    runs = [compare.load_run(os.path.join(str(tmp_path), "runs", n)) for n in ("sync", "local")]
    np.testing.assert_allclose(runs[0]["evals"]["val_loss"], runs[1]["evals"]["val_loss"], rtol=2e-5)
    # the same bytes per sample: one all-reduce of the whole buffer per step either way
    sync_bytes, local_bytes = (compare.comm_bytes_per_sample(m) for m in runs)
    assert local_bytes == pytest.approx(sync_bytes) and local_bytes > 0


@single_process_only
def test_signal_checkpoints_at_the_round_end_and_resume_is_bitwise(tmp_path, corpus):  # noqa: F811
    """AdamW (per-rank moments in the checkpoint): SIGUSR1 at step 2 stops at the end of the round
    (step 4, H = 4); --resume finishes and matches the uninterrupted run bit for bit."""
    args = ["--set", "parallel.mode=local", "--set", "parallel.local_steps=4"]
    train(tmp_path, corpus, *args, np=2, name="whole")
    train(tmp_path, corpus, *args, np=2, name="cut", env=clean_env(LLMPI_FAULT="0:2:USR1"))
    assert len(steps(tmp_path, "cut")["step"]) == 4
    proc = train(tmp_path, corpus, *args, "--resume", np=3, name="cut", check=False)
    assert proc.returncode == 2 and "resume it with 2 ranks" in proc.stderr, proc.stderr
    train(tmp_path, corpus, *args, "--resume", np=2, name="cut")
    whole, cut = steps(tmp_path, "whole"), steps(tmp_path, "cut")
    np.testing.assert_array_equal(whole["step"], cut["step"])
    assert whole["loss"].tobytes() == cut["loss"].tobytes()


@single_process_only
def test_local_ends_at_8_ranks_and_sends_h_times_fewer_bytes(tmp_path, corpus):  # noqa: F811
    train(tmp_path, corpus, "--set", "parallel.mode=local", "--set", "parallel.local_steps=4", np=8, name="l8",
          timeout=120)
    m = compare.load_run(os.path.join(str(tmp_path), "runs", "l8"))
    assert len(m["steps"]["step"]) == 12 and m["evals"]["step"][-1] == 12
    params = GPT(m["job"].model).params.data.nbytes
    # 3 rounds of 4 steps, each one all-reduce: 2 x params bytes on each of 8 ranks, over 12 x 8 samples
    assert compare.comm_bytes_per_sample(m) == pytest.approx(3 * 2 * params * 8 / 96)


@single_process_only
@pytest.mark.parametrize("override,message", [
    ("parallel.mode=local --set parallel.local_steps=0", "parallel.local_steps must be positive (got 0)"),
    ("parallel.mode=async --set parallel.dc_lambda=-1", "parallel.dc_lambda must be >= 0"),
    ("parallel.async_rule=fancy", "parallel.async_rule = 'fancy' is not allowed; choose one of: plain, staleness, dc"),
    ("parallel.mode=local --set parallel.outer_momentum=1", "parallel.outer_momentum must be in [0, 1)"),
    ("parallel.mode=local --set parallel.pipeline=2", "parallel.pipeline > 1 needs parallel.mode = 'sync'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, corpus, override, message):  # noqa: F811
    proc = train(tmp_path, corpus, *f"--set {override}".split(), np=2, check=False, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr

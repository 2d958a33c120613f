"""Reliability of the async and local-SGD loops (issue 21, failure 4 and the NaN stop): periodic
async checkpoints without a collective in the loop, a crash that loses at most ckpt_interval steps,
and a loss that turns non-finite ending the job in one line before its update lands."""
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from cli import clean_env, mpiexec, run, single_process_only
from test_reliability import corpus, train_args  # noqa: F401 (the module's corpus fixture)

pytestmark = single_process_only

ASYNC = ["--set", "parallel.mode=async", "--set", "train.ckpt_interval=2", "--set", "schedule.decay_iters=12",
         "--set", "train.max_iters=12"]


def _checkpoints(run_dir):
    """The manifests (not the temporaries of one being written)."""
    return sorted(n for n in os.listdir(run_dir) if re.fullmatch(r"ckpt_\d{7}\.h5", n))


def test_async_writes_periodic_checkpoints_that_resume(tmp_path, corpus):  # noqa: F811
    proc = run(train_args(corpus, "aper", *ASYNC), np=2, cwd=str(tmp_path), check=True)
    run_dir = os.path.join(str(tmp_path), "runs", "aper")
    assert proc.stdout.count("checkpoint: runs/aper/ckpt_") >= 2  # periodic ones, then the final one
    kept = _checkpoints(run_dir)
    # pruned to two as in sync mode: the final one and the newest periodic one that every rank wrote
    # its part of (near the end a rank may leave the loop, the budget spent, before it passes one)
    assert len(kept) == 2 and kept[-1] == "ckpt_0000012.h5" and int(kept[0][5:12]) in (2, 4, 6, 8, 10), kept
    steps = {n[5:12] for n in kept}
    assert all(n.split("_")[1][:7] in steps for n in os.listdir(run_dir) if n.startswith(("rank", "stage")))
    from llmpi.training import checkpoint
    ck = checkpoint.verify(os.path.join(run_dir, kept[0]))
    assert ck.attrs["version"] == 2 * int(kept[0][5:12]) and len(ck.rank_files) == 2
    assert sorted(ck.per_rank["optim"]) == [0, 1] and sorted(ck.per_rank["sampler"]) == [0, 1]
    assert 0 < int(ck.attrs["samples"]) <= ck.attrs["version"] * 8


def test_a_crash_in_async_mode_loses_at_most_the_checkpoint_interval(tmp_path, corpus):  # noqa: F811
    """The job is killed (SIGKILL to every process) once a periodic checkpoint exists: --resume
    continues from the newest one, whose parts every rank wrote, and spends the rest of the budget."""
    run_dir = tmp_path / "runs" / "acrash"
    longer = [*ASYNC, "--set", "train.max_iters=100000", "--set", "schedule.decay_iters=100000"]
    job = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, *train_args(corpus, "acrash", *longer)],
                           cwd=str(tmp_path), env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run_dir.is_dir() and _checkpoints(run_dir)) and time.time() < deadline and job.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    kept = _checkpoints(run_dir)
    assert kept, "no periodic checkpoint within 120 s"
    step = int(_checkpoints(run_dir)[-1][5:12])
    more = [*ASYNC, "--set", f"train.max_iters={step + 4}", "--set", f"schedule.decay_iters={step + 4}", "--resume"]
    proc = run(train_args(corpus, "acrash", *more), np=2, cwd=str(tmp_path), check=True)
    assert f"resumed from runs/acrash/ckpt_{step:07d}.h5" in proc.stdout
    assert _checkpoints(run_dir)[-1] == f"ckpt_{step + 4:07d}.h5"
    assert not [n for n in os.listdir(run_dir) if ".tmp" in n]
    from llmpi.training import metrics
    steps = metrics.read(os.path.join(run_dir, "metrics.h5"))["steps"]
    assert steps["step"].max() == 2 * (step + 4)  # the rest of the budget (4 steps x 2 ranks) was spent


def _params_finite(run_dir):
    from llmpi.training import checkpoint
    for name in _checkpoints(run_dir):
        ck = checkpoint.load(os.path.join(run_dir, name))
        for value in ck.params(ck.names()).values():
            if not np.isfinite(value).all():
                return False
    return True


@pytest.mark.parametrize("mode", ["async", "local"])
def test_a_loss_that_turns_nan_stops_async_and_local_runs_in_one_line(tmp_path, corpus, mode):  # noqa: F811
    proc = run(train_args(corpus, "nan", "--set", f"parallel.mode={mode}", "--set", "optim.lr=1e6",
                          "--set", "schedule.min_lr=0", "--set", "schedule.warmup_iters=0",
                          "--set", "optim.grad_clip=0", "--set", "train.max_iters=40",
                          "--set", "train.ckpt_interval=1", "--set", "parallel.local_steps=1"), np=2, cwd=str(tmp_path), check=False, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "the loss became nan" in lines[0] or "the weights became non-finite" in lines[0], lines[0]
    run_dir = os.path.join(str(tmp_path), "runs", "nan")
    assert "is the last checkpoint" in lines[0] and _checkpoints(run_dir)
    assert _params_finite(run_dir)  # no checkpoint holds the update that made the loss non-finite
    with h5py.File(os.path.join(run_dir, _checkpoints(run_dir)[-1]), "r") as f:
        assert int(f.attrs["step"]) < 40

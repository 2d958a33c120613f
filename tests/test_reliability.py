"""Reliability as an HPC user meets it (issue 21): two jobs on one run directory, stale locks
of killed jobs, damaged checkpoints (skipped on --resume, never pruned over the last good one)."""
import json
import os
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from cli import REPO, clean_env, mpiexec, run, single_process_only

pytestmark = single_process_only

TINY = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
        "--set", "model.block_size=16", "--set", "train.batch_size=8", "--set", "train.max_iters=6",
        "--set", "train.log_interval=2", "--set", "train.eval_interval=0", "--set", "train.eval_iters=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus") / "tiny.h5")
    run(["-m", "llmpi.data", "prepare", "--input", os.path.join(REPO, "llmpi", "training"), "--out", out], check=True)
    return out


def train_args(corpus, name, *extra):
    return ["-m", "llmpi.train", *TINY, "--set", f"data.path={corpus}", "--run-name", name, *extra]


def test_a_second_job_on_the_same_run_directory_is_refused(tmp_path, corpus):
    cmd = [mpiexec(), "-n", "2", sys.executable, *train_args(corpus, "same", "--set", "train.max_iters=400")]
    first = subprocess.Popen(cmd, cwd=str(tmp_path), env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = tmp_path / "runs" / "same" / ".lock"
    try:
        for _ in range(300):
            if lock.exists():
                break
            time.sleep(0.1)
        assert lock.exists()
        second = run(train_args(corpus, "same", "--set", "train.seed=7"), np=2, cwd=str(tmp_path), check=False)
        assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr
        holder = json.loads(lock.read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] > 0
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert not lock.exists()  # released at the end of the run


def test_a_stale_lock_of_a_killed_job_is_removed(tmp_path, corpus):
    lock = tmp_path / "runs" / "stale" / ".lock"
    lock.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "job": "", "since": "then"}))
    proc = run(train_args(corpus, "stale"), cwd=str(tmp_path), check=True)
    assert "removed the stale lock of pid" in proc.stdout and not lock.exists()
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "job": "42", "since": "then"}))
    proc = run(train_args(corpus, "stale", "--overwrite"), cwd=str(tmp_path), check=False)
    assert proc.returncode == 2 and "in use by pid 1 on another-node, Slurm job 42" in proc.stderr


def _stage_file(run_dir, step, stage=0):
    return os.path.join(run_dir, f"stage{stage}_{step:07d}.h5")


def test_a_bit_flipped_checkpoint_is_skipped_on_resume_and_never_pruned_over(tmp_path, corpus):
    """4 KiB of one checkpoint's parameters flipped: --resume names it, takes the newest one that
    verifies, and training on does not prune that good one before a newer one verifies."""
    every2 = ["--set", "train.ckpt_interval=2", "--set", "schedule.decay_iters=10"]
    run(train_args(corpus, "whole", *every2, "--set", "train.max_iters=10"), cwd=str(tmp_path), check=True)
    run(train_args(corpus, "flip", *every2), cwd=str(tmp_path), check=True)
    run_dir = os.path.join(str(tmp_path), "runs", "flip")
    with h5py.File(_stage_file(run_dir, 6), "r+") as f:  # the newest checkpoint (steps 4 and 6 are kept)
        wte = f["params/wte"]
        flat = wte[()].reshape(-1)
        flat[:1024] = (flat[:1024].view(np.uint32) ^ np.uint32(0x00400000)).view(np.float32)
        wte[...] = flat.reshape(wte.shape)
    proc = run(train_args(corpus, "flip", *every2, "--set", "train.max_iters=10", "--resume"), np=2,
               cwd=str(tmp_path), check=True)
    assert "resume: skipped ckpt_0000006.h5" in proc.stdout and "checksum mismatch in /params/wte" in proc.stdout
    assert "resumed from runs/flip/ckpt_0000004.h5 at step 4" in proc.stdout
    from llmpi.training import metrics
    whole = metrics.read(os.path.join(str(tmp_path), "runs", "whole", "metrics.h5"))["steps"]
    flip = metrics.read(os.path.join(run_dir, "metrics.h5"))["steps"]
    np.testing.assert_array_equal(flip["step"], whole["step"])
    np.testing.assert_allclose(flip["loss"], whole["loss"], rtol=2e-5)  # as if the damage never happened
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt_"))
    assert names == ["ckpt_0000008.h5", "ckpt_0000010.h5"]  # the damaged 6 was rewritten, then pruned


def test_a_checkpoint_locked_by_hdf5_is_not_called_corrupt(tmp_path, corpus):
    run(train_args(corpus, "locked"), cwd=str(tmp_path), check=True)
    path = os.path.join(str(tmp_path), "runs", "locked", "ckpt_0000006.h5")
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({path!r}, 'r+'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env=clean_env())
    try:
        assert holder.stdout.readline().strip() == "open"
        proc = run(train_args(corpus, "locked", "--set", "train.max_iters=8", "--resume"), cwd=str(tmp_path),
                   check=False)
    finally:
        holder.kill()
    assert proc.returncode == 2 and "is locked by another process" in proc.stderr
    assert "HDF5_USE_FILE_LOCKING=FALSE" in proc.stderr and "corrupt" not in proc.stderr


def test_prune_keeps_the_newest_verified_checkpoint_whatever_its_age(tmp_path):
    from llmpi.training import checkpoint
    for step in (2, 4, 6, 8):
        (tmp_path / f"ckpt_{step:07d}.h5").write_bytes(b"")
        (tmp_path / f"stage0_{step:07d}.h5").write_bytes(b"")
    checkpoint.prune(str(tmp_path), keep=2, protect=str(tmp_path / "ckpt_0000002.h5"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000002.h5", "ckpt_0000006.h5", "ckpt_0000008.h5",
                                            "stage0_0000002.h5", "stage0_0000006.h5", "stage0_0000008.h5"]


def test_temporaries_of_killed_writers_are_removed_at_start(tmp_path, corpus):
    run(train_args(corpus, "tmp"), cwd=str(tmp_path), check=True)
    run_dir = tmp_path / "runs" / "tmp"
    for name in ("ckpt_0000006.h5.tmp.12345", "stage1_0000006.h5.tmp.999", "metrics.h5.tmp.4242", "timeline.h5.tmp"):
        (run_dir / name).write_bytes(b"x" * 1000)
    proc = run(train_args(corpus, "tmp", "--set", "train.max_iters=8", "--resume"), cwd=str(tmp_path), check=True)
    assert proc.stdout.count("left by a writer that was killed") == 4
    assert not [n for n in os.listdir(run_dir) if ".tmp" in n]


def test_a_loss_that_turns_nan_stops_the_run_with_one_line(tmp_path, corpus):
    """optim.lr = 1e6 blows the weights up within a few steps: the run stops at the first
    non-finite loss, before that update, and says which step."""
    proc = run(train_args(corpus, "nan", "--set", "optim.lr=1e6", "--set", "schedule.min_lr=0",
                          "--set", "schedule.warmup_iters=0", "--set", "optim.grad_clip=0",
                          "--set", "train.max_iters=40"), np=2, cwd=str(tmp_path), check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "the loss became nan at step" in lines[0], proc.stderr


def test_a_launcher_of_another_mpi_is_refused_and_reported(tmp_path, corpus):
    """Open MPI's mpiexec starting an MPICH-built mpi4py: N singletons that would each train the
    run as rank 0 of 1. The launcher's environment says N, MPI says 1: one line, exit 2."""
    env = clean_env(OMPI_COMM_WORLD_SIZE=4)
    proc = run(train_args(corpus, "mismatch"), cwd=str(tmp_path), env=env, check=False)
    assert proc.returncode == 2 and "the launcher started 4 processes (OMPI_COMM_WORLD_SIZE=4" in proc.stderr
    assert not (tmp_path / "runs" / "mismatch").exists()
    info = run(["-m", "llmpi", "info", "--json"], cwd=str(tmp_path), env=env, check=True)
    assert "the launcher started 4 processes" in json.loads(info.stdout.strip().splitlines()[-1])["launcher"]


@pytest.mark.parametrize("override,message", [
    ("optim.lr=inf", "optim.lr must be a finite number"), ("optim.weight_decay=nan", "optim.weight_decay must be a finite"),
    ("optim.eps=nan", "optim.eps must be"), ("optim.grad_clip=nan", "optim.grad_clip must be a finite"),
    ("parallel.bucket_mb=nan", "parallel.bucket_mb must be a finite"),
    ("train.seed=99999999999999999999999", "train.seed must be below 2**63"),
    ("optim.name=sgd --set optim.nesterov=true --set optim.momentum=0", "optim.nesterov = true needs optim.momentum > 0"),
    ("train.batch_size=2000000", "GiB each on cpu; use a smaller train.batch_size"),
])
def test_numbers_that_would_train_to_nan_or_crash_are_refused(tmp_path, corpus, override, message):
    proc = run(train_args(corpus, "bad", *f"--set {override}".split()), cwd=str(tmp_path), check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_quotes_and_backslashes_in_names_survive_the_checkpoint(tmp_path, corpus):
    import shutil
    odd = tmp_path / "da\\ta"
    odd.mkdir()
    shutil.copy(corpus, odd / "c.h5")
    args = train_args(str(odd / "c.h5"), 'my"run')
    run(args, cwd=str(tmp_path), check=True)
    proc = run([*args, "--set", "train.max_iters=8", "--resume"], cwd=str(tmp_path), check=True)
    assert "resumed from" in proc.stdout
    run(["-m", "llmpi.sample", 'runs/my"run', "--tokens", "5"], cwd=str(tmp_path), check=True)
    proc = run(train_args(corpus, "../../x"), cwd=str(tmp_path), check=False)  # would write outside runs/
    assert proc.returncode == 2 and "must name a directory inside train.out_dir" in proc.stderr


def test_a_hung_rank_is_named_by_the_watchdog_and_ends_the_job(tmp_path, corpus):
    """Rank 1 stops responding at step 3 while rank 0 waits for it in the step's collective: within
    train.watchdog_s both say so with their stacks, and the job ends instead of hanging."""
    t0 = time.time()
    proc = run(train_args(corpus, "hang", "--set", "train.watchdog_s=3", "--set", "train.max_iters=40"), np=2,
               cwd=str(tmp_path), check=False, env=clean_env(LLMPI_FAULT="1:3:HANG"), timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "[rank 1] watchdog: no step completed for 3 s" in proc.stderr
    assert "in check" in proc.stderr  # rank 1's stack shows where it hangs (the injected fault)
    assert "[rank 0] watchdog" in proc.stderr or "Abort" in proc.stderr


def test_a_data_file_locked_by_hdf5_is_named_as_locked(tmp_path, corpus):
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({corpus!r}, 'r+'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env=clean_env())
    try:
        assert holder.stdout.readline().strip() == "open"
        proc = run(train_args(corpus, "dlock"), cwd=str(tmp_path), check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and "is locked by another process" in proc.stderr
    assert "HDF5_USE_FILE_LOCKING=FALSE" in proc.stderr and "damaged" not in proc.stderr


def test_compare_into_a_read_only_directory_is_one_line(tmp_path, corpus):
    run(train_args(corpus, "ro"), cwd=str(tmp_path), check=True)
    for target in ("/proc/llmpi_figure.png", str(tmp_path / "no" / "such" / "f.png")):  # /proc: even for root
        proc = run(["-m", "llmpi.compare", "runs/ro", "--plot", target], cwd=str(tmp_path), check=False)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "--plot" in lines[0], proc.stderr

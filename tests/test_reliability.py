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

"""slurm/*.sh under a real Slurm: the one-node cluster of .ci/slurm_up.sh (Debian's slurm-wlm and
munge: slurmctld + slurmd on this machine), real sbatch, srun --mpi=pmi2 and PyPI's MPICH.

* a tiny job of train.sh runs to the end on 2 ranks and leaves its checkpoint and metrics;
* a job warned with USR1 (scancel --batch --signal=USR1, what the time-limit warning does)
  checkpoints, requeues itself and the requeued job (same id) resumes to the end with bitwise the
  losses of an uninterrupted job; LLMPI_REQUEUE=0 ends it after the checkpoint instead;
* the real time limit (--time=1) warns the job, which checkpoints, requeues and resumes;
* compare.sh, warned during its first run, requeues and ends with the table of both runs.

Skipped, with the reason, where sinfo is missing or the cluster does not answer (CI starts it with
.ci/slurm_up.sh and prints why when it cannot). Plain pytest only: under `mpiexec -n 4 pytest
--with-mpi` every rank would submit the same jobs. Jobs ask for --ntasks-per-node=2 (the scripts'
4 per node do not fit a 2-CPU node, and --overcommit does not lift a per-node count); the tests wait
by polling `scontrol show job` (sbatch --wait polls with a growing back-off, ~30 s late).
"""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from cli import REPO, clean_env, run, single_process_only
from llmpi.training import metrics

pytestmark = single_process_only

TASKS = 2
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=8",
        "train.eval_iters=2", "schedule.warmup_iters=3"]
SCRUB = ("SLURM_", "SBATCH_", "SRUN_", "LLMPI_", "NP")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE"}


def cluster_problem():
    """Why the real-Slurm tests cannot run here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm here (sinfo/sbatch not on PATH; .ci/slurm_up.sh starts a one-node cluster as root)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if proc.returncode != 0:
        return f"the Slurm cluster is not up: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    nodes = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    usable = [n for n in nodes if n[0].rstrip("*~#") in ("idle", "mixed", "allocated", "completing")
              and not n[0].endswith("*")]
    if not usable:
        return f"no Slurm node is up (sinfo: {proc.stdout.strip() or 'no nodes'})"
    if max(int(n[1]) for n in usable) < TASKS:
        return f"no Slurm node has {TASKS} CPUs"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem:
        pytest.skip(f"real Slurm: {problem}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, cluster):
    out = str(tmp_path_factory.mktemp("corpus") / "tiny.h5")
    run(["-m", "llmpi.data", "prepare", "--input", os.path.join(REPO, "llmpi"), "--out", out], check=True)
    return out


def job_env(**extra):
    """The test's environment without an outer job's Slurm and llmpi settings; the jobs inherit it
    (sbatch --export=ALL), so they find this Python first on PATH."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(SCRUB)}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # train.sh sets them from --cpus-per-task
        env.pop(var, None)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def submit(tmp_path, script, name, *args, options=(), **env):
    """sbatch slurm/SCRIPT as job NAME from tmp_path; returns the job id."""
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--ntasks-per-node={TASKS}", "--time=5", *options,
           os.path.join(REPO, "slurm", script), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=job_env(**env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(job_id):
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


def wait(job_id, until=lambda info: info["JobState"] in DONE, timeout=240):
    """Poll the job until `until(info)` holds; a job that never gets there is cancelled and fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(job_id)
        if until(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} did not get there within {timeout} s: {job(job_id)}")


def log(tmp_path, name, job_id):
    path = tmp_path / f"slurm-{name}-{job_id}.out"
    return path.read_text() if path.exists() else ""


def wait_for_log(tmp_path, name, job_id, pattern, timeout=120):
    wait(job_id, lambda info: re.search(pattern, log(tmp_path, name, job_id), re.M) is not None
         or info["JobState"] in DONE, timeout)
    text = log(tmp_path, name, job_id)
    assert re.search(pattern, text, re.M), f"{pattern!r} never appeared:\n{text}"
    return text


def steps(tmp_path, run_name):
    return metrics.read(str(tmp_path / "runs" / run_name / "metrics.h5"))["steps"]


def test_train_job_runs_to_the_end(tmp_path, corpus):
    job_id = submit(tmp_path, "train.sh", "tiny", *TINY, f"data.path={corpus}", "train.max_iters=12",
                    "train.log_interval=4", "train.eval_interval=6")
    info = wait(job_id)
    out = log(tmp_path, "tiny", job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert f"llmpi: {TASKS} rank(s)" in out and out.count("eval: step 12") == 1, out  # rank 0 prints once
    run_dir = tmp_path / "runs" / f"tiny-{job_id}"
    assert (run_dir / "ckpt_0000012.h5").exists()
    assert steps(tmp_path, f"tiny-{job_id}")["step"].tolist() == list(range(1, 13))


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_losses(tmp_path, corpus):
    args = [*TINY, f"data.path={corpus}", "train.max_iters=1500", "train.log_interval=25", "train.eval_interval=500",
            "train.ckpt_interval=0"]
    whole = submit(tmp_path, "train.sh", "whole", *args)
    cut = submit(tmp_path, "train.sh", "cut", *args)
    wait_for_log(tmp_path, "cut", cut, r"^step +25/")
    subprocess.run(["scancel", "--batch", "--signal=USR1", cut], check=True, timeout=30)
    info = wait(cut)
    out = log(tmp_path, "cut", cut)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert info["Restarts"] == "1", out
    stop = re.search(r"stop requested by signal: checkpointed at step (\d+)", out)
    assert stop and int(stop.group(1)) < 1500, f"the job ended before the signal reached it:\n{out}"
    assert f"requeueing job {cut} (restart 1)" in out
    assert f"resumed from runs/cut-{cut}/ckpt_{int(stop.group(1)):07d}.h5" in out
    assert wait(whole)["JobState"] == "COMPLETED", log(tmp_path, "whole", whole)
    a, b = steps(tmp_path, f"whole-{whole}"), steps(tmp_path, f"cut-{cut}")
    np.testing.assert_array_equal(a["step"], np.arange(1, 1501))
    np.testing.assert_array_equal(a["step"], b["step"])
    assert a["loss"].tobytes() == b["loss"].tobytes()
    last = re.findall(r"^eval: step 1500 .*$", log(tmp_path, "whole", whole) + out, re.M)
    assert len(last) == 2 and last[0] == last[1], last
    print(f"\nstopped at step {stop.group(1)}, requeued; final: {last[1]} (uninterrupted: {last[0]})")


def test_requeue_opt_out(tmp_path, corpus):
    job_id = submit(tmp_path, "train.sh", "stay", *TINY, f"data.path={corpus}", "train.max_iters=100000",
                    "train.log_interval=25", "train.eval_interval=0", "train.ckpt_interval=0", LLMPI_REQUEUE=0)
    wait_for_log(tmp_path, "stay", job_id, r"^step +25/")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
    info = wait(job_id)
    out = log(tmp_path, "stay", job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", out
    assert "not requeued (LLMPI_REQUEUE=0)" in out and "resumed from" not in out
    assert list((tmp_path / "runs" / f"stay-{job_id}").glob("ckpt_*.h5"))


def test_time_limit_warns_checkpoints_and_requeues(tmp_path, corpus):
    """--time=1 (Slurm's shortest): the warning comes from slurmctld, not from a test. The job would
    run for hours, so once the requeued job has resumed and stepped on, the test cancels it. Slurm
    sends the warning up to ~30 s before warn time, so @10 (not the script's @120, which under a
    one-minute limit would come at once, maybe before the ranks listen)."""
    job_id = submit(tmp_path, "train.sh", "limit", *TINY, f"data.path={corpus}", "train.max_iters=100000000",
                    "train.log_interval=250", "train.eval_interval=0", "train.ckpt_interval=0",
                    options=["--time=1", "--signal=B:USR1@10"])
    try:
        out = wait_for_log(tmp_path, "limit", job_id, r"^resumed from .*\n(.*\n)*step ", timeout=200)
        info = job(job_id)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    assert int(info["Restarts"]) >= 1, info
    stop = re.search(r"stop requested by signal: checkpointed at step (\d+)", out)
    assert stop, out
    assert f"requeueing job {job_id} (restart 1)" in out
    assert f"resumed from runs/limit-{job_id}/ckpt_{int(stop.group(1)):07d}.h5" in out
    assert "TIME LIMIT" not in out  # requeued before the limit, not killed at it


def test_compare_sh_requeues_and_ends_with_its_table(tmp_path, corpus):
    """Warned during its first run, compare.sh requeues; the requeued job resumes that run, trains the
    second and ends with the table of both."""
    job_id = submit(tmp_path, "compare.sh", "cmp", *TINY, f"data.path={corpus}", "train.max_iters=600",
                    "train.log_interval=25", "train.eval_interval=300", "train.ckpt_interval=0")
    wait_for_log(tmp_path, "cmp", job_id, r"^step +25/")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
    info = wait(job_id)
    out = log(tmp_path, "cmp", job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", out
    assert f"compare.sh: stopped by USR1 after a checkpoint: requeueing job {job_id}" in out
    assert f"resumed from runs/cmp-sync-{job_id}/ckpt_" in out
    lines = out.rstrip("\n").splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("run ") and "val loss" in line)
    rows = [line.split()[0] for line in lines[header + 2:header + 4]]
    assert rows == [f"cmp-sync-{job_id}", f"cmp-async-{job_id}"], out
    assert lines[header + 4].startswith("target loss:") and lines[-1] == f"figure: runs/compare-{job_id}.png"
    assert (tmp_path / "runs" / f"compare-{job_id}.png").exists()
    assert steps(tmp_path, f"cmp-sync-{job_id}")["step"].tolist() == list(range(1, 601))

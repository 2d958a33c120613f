"""Run llmpi's command lines in subprocesses, the way a user would, from inside tests.

Under `mpiexec -n 4 pytest --with-mpi` the test process is itself an MPI rank: its
PMI/Hydra variables would make a child `mpiexec` or Python join the parent's job,
so they are removed from the child's environment. Tests that launch their own jobs
run in the single-process pass (`python -m pytest`) and skip under mpiexec, where
the idle ranks would spin in MPI while rank 0's children compete for the cores.
"""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_VARS = ("PMI_", "PMIX_", "HYDRA_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "OMPI_", "MPIR_CVAR_")


single_process_only = pytest.mark.skipif(
    any(v in os.environ for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")),
    reason="launches its own mpiexec jobs: runs in the single-process pytest pass")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def mpiexec():
    exe = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return exe


def run(args, np=1, timeout=120, cwd=None, env=None, check=False):
    """Run `python ARGS...` (under mpiexec -n np when np > 1); returns CompletedProcess."""
    if "llmpi.train" in args and not any("train.cpu_kernels" in a for a in args):
        args = [*args, "--set", "train.cpu_kernels=numpy"]  # the fused kernels have their own tests
    cmd = [sys.executable, *args]
    if np > 1:
        cmd = [mpiexec(), "-n", str(np), *cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc

"""A built wheel carries the CUDA kernels and job files, found without environment variables."""
import os
import shutil
import subprocess
import sys
import zipfile

from cli import REPO, clean_env, single_process_only

pytestmark = single_process_only


def test_wheel_ships_kernels_and_jobs_and_finds_them(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    shutil.copytree(REPO, str(src), ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "runs", "*.h5", ".venv", "venv", "__pycache__", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = [p for p in os.listdir(str(tmp_path)) if p.endswith(".whl")]
    site = tmp_path / "site"
    with zipfile.ZipFile(str(tmp_path / wheel)) as z:
        names = set(z.namelist())
        z.extractall(str(site))
    kernels = {n for n in os.listdir(os.path.join(REPO, "kernels")) if n.endswith((".cu", ".cuh"))}
    assert {f"llmpi/_kernels/{k}" for k in kernels} <= names
    assert "llmpi/_jobs/default.toml" in names
    # From an unrelated directory, with only the unpacked wheel on the path.
    env = clean_env()
    env["PYTHONPATH"] = str(site)
    code = ("import llmpi.gpu.loader as k, llmpi.config as c; print(k.kernel_dir()); "
            "print(c.find_job_file('default'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == str(site / "llmpi" / "_kernels")
    assert out[1] == str(site / "llmpi" / "_jobs" / "default.toml")

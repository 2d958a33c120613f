"""Helpers shared by the benchmarks: timing, machine description, JSON output."""
import json
import os
import platform
import time

import numpy as np


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def median_time(fn, repeats=5, warmup=1):
    """Median wall seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def memcpy_bandwidth(nbytes=64 << 20, repeats=5) -> float:
    """Measured host memory-copy bandwidth in bytes/s (read + write counted once each)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    t = median_time(lambda: np.copyto(dst, src), repeats)
    return 2 * nbytes / t


def thread_scaling(threads, calls=200):
    """How much faster `threads` threads finish `threads` times the work of one, each running
    single-threaded BLAS GEMMs of the baby model's size (384x128 @ 128x512) at once: about
    `threads` on idle cores, less where the cores are shared (a VM's vCPUs on one physical core,
    other load). A fact about the machine at that moment, printed beside thread benchmarks."""
    import threading

    from ..parallel.threaded import blas_threads
    r = np.random.default_rng(0)
    a, b = r.standard_normal((384, 128)).astype(np.float32), r.standard_normal((128, 512)).astype(np.float32)

    def work():
        for _ in range(calls):
            a @ b
    with blas_threads(1):
        work()
        t0 = time.perf_counter()
        work()
        one = time.perf_counter() - t0
        pool = [threading.Thread(target=work) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        many = time.perf_counter() - t0
    return threads * one / many


def emit_json(obj: dict, enabled: bool):
    if enabled:
        print(json.dumps(obj, sort_keys=True), flush=True)


LAUNCHER_VARS = ("PMI_", "PMIX_", "HYDRA_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "OMPI_")


def run_training(np_, args, out_dir, threads=1, extra_env=None, timeout=3600):
    """Launch `mpiexec -n np_ python -m llmpi.train ARGS` as a user would; returns metrics.h5.

    Launcher variables of an enclosing MPI job are dropped so the child is its own job."""
    import shutil
    import subprocess
    import sys

    from ..cli import THREAD_VARS
    from ..training import metrics

    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    for var in THREAD_VARS:
        env[var] = str(threads)
    env.update(extra_env or {})
    name = next(a.split("=", 1)[1] for a in args if a.startswith("train.run_name="))
    cmd = [sys.executable, "-m", "llmpi.train", *[x for a in args for x in ("--set", a)],
           "--set", f"train.out_dir={out_dir}", "--overwrite"]
    if np_ > 1:
        mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec, "-n", str(np_), *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return metrics.read(os.path.join(out_dir, name, "metrics.h5"))


def step_seconds(m, skip=5):
    """Median seconds per step from a metrics log, skipping warm-up steps."""
    wall = np.asarray(m["steps"]["wall"])
    return float(np.median(np.diff(wall[skip:])))

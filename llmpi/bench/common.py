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


def emit_json(obj: dict, enabled: bool):
    if enabled:
        print(json.dumps(obj, sort_keys=True), flush=True)

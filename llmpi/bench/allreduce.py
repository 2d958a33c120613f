"""All-reduce benchmark: our ring / recursive doubling / auto against MPI_Allreduce.

    mpiexec -n 4 python -m llmpi.bench allreduce [--json] [--min 4KiB] [--max 64MiB]
                                                 [--repeats 7] [--algorithms ring,rd,auto]

For each message size (powers of 4 from --min to --max, float32) every algorithm is
timed in the same run, interleaved repeat by repeat so that noise from other users of
the machine hits all of them alike. One timing = barrier, then the call; a repeat's
time is the slowest rank's; the figure is the median over repeats.
algbw = bytes / time; busbw = algbw * 2(P-1)/P (the per-rank link traffic of a
bandwidth-optimal all-reduce, comparable across P); speed = MPI time / our time.
The ceiling column is the measured host memory-copy bandwidth.
`--json`: the last line holds `ratio` (geometric mean of MPI/auto speed over sizes
>= 1 MiB), `ratio_small` (same below 1 MiB), `ratio_ring` and per-size data.
"""
import time

import numpy as np
from mpi4py import MPI

from llmpi.bench._common import emit_json, machine, memcpy_bandwidth
from llmpi.cli import ArgumentParser
from llmpi.comm.allreduce import ALGORITHMS, allreduce_sum
from llmpi.comm.allreduce.auto import THRESHOLD_BYTES as AUTO_THRESHOLD_BYTES
from llmpi.comm.world import rprint, world
from llmpi.errors import UserError

_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "K": 1 << 10, "KB": 1 << 10, "MIB": 1 << 20, "M": 1 << 20,
          "MB": 1 << 20, "GIB": 1 << 30, "G": 1 << 30, "GB": 1 << 30}
LARGE = 1 << 20


def parse_bytes(text: str) -> int:
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * _UNITS[t[len(num):]])
    except (ValueError, KeyError):
        raise UserError(f"cannot read a byte size from {text!r} (try 4KiB, 64MiB)") from None
    if value < 4:
        raise UserError(f"message size {text!r} is below one float32")
    return value


def human(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def sizes(lo: int, hi: int):
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 4
    return out


def time_all(algorithms, nbytes, repeats, comm):
    """{algorithm: median over repeats of the slowest rank's seconds}."""
    n = nbytes // 4
    src = np.full(n, comm.Get_rank() + 1, dtype=np.float32)
    buf = np.empty_like(src)
    times = np.zeros((repeats + 1, len(algorithms)))
    for rep in range(repeats + 1):  # repeat 0 warms up caches, scratch and connections
        for a, alg in enumerate(algorithms):
            np.copyto(buf, src)
            comm.Barrier()
            t0 = time.perf_counter()
            allreduce_sum(buf, comm, alg)
            times[rep, a] = time.perf_counter() - t0
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return {alg: float(np.median(times[1:, a])) for a, alg in enumerate(algorithms)}


def geomean(values):
    return float(np.exp(np.mean(np.log(values)))) if values else None


def main(argv=None):
    ap = ArgumentParser(prog="python -m llmpi.bench allreduce", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="last line: JSON summary")
    ap.add_argument("--min", default="4KiB", help="smallest message (default 4KiB)")
    ap.add_argument("--max", default="64MiB", help="largest message (default 64MiB)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per size (median)")
    ap.add_argument("--algorithms", default="ring,rd,auto", help="compared against mpi (comma list)")
    args = ap.parse_args(argv)
    ours = [a for a in args.algorithms.split(",") if a]
    bad = [a for a in ours if a not in ALGORITHMS or a == "mpi"]
    if bad or not ours:
        raise UserError(f"--algorithms takes a comma list of ring, rd, auto (got {args.algorithms!r})")
    if "auto" not in ours:
        ours.append("auto")
    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    lo, hi = parse_bytes(args.min), parse_bytes(args.max)
    if lo > hi:
        raise UserError(f"--min {args.min} is above --max {args.max}")
    comm = world()
    p = comm.Get_size()
    algorithms = ["mpi"] + ours
    ceiling = memcpy_bandwidth()
    rprint(f"# all-reduce, {p} ranks, float32, median of {args.repeats} | {machine()}")
    rprint(f"# {MPI.Get_library_version().splitlines()[0]}; auto = rd below {human(AUTO_THRESHOLD_BYTES)}, "
           f"ring above; memcpy ceiling {ceiling / 1e9:.2f} GB/s")
    head = f"{'size':>10} " + " ".join(f"{a + ' ms':>9}" for a in algorithms)
    head += " " + " ".join(f"{a + ' x':>7}" for a in ours) + f" {'auto busbw':>11}"
    rprint(head)
    rows = []
    for nbytes in sizes(lo, hi):
        t = time_all(algorithms, nbytes, args.repeats, comm)
        speed = {a: t["mpi"] / t[a] for a in ours}
        algbw = {a: nbytes / t[a] for a in algorithms}
        busbw = {a: algbw[a] * 2 * (p - 1) / p for a in algorithms}
        rows.append({"bytes": nbytes, "seconds": t, "speed_vs_mpi": speed, "algbw": algbw, "busbw": busbw})
        line = f"{human(nbytes):>10} " + " ".join(f"{t[a] * 1e3:9.3f}" for a in algorithms)
        line += " " + " ".join(f"{speed[a]:7.2f}" for a in ours) + f" {busbw['auto'] / 1e9:8.2f} GB/s"
        rprint(line)
    big = [r["speed_vs_mpi"]["auto"] for r in rows if r["bytes"] >= LARGE]
    small = [r["speed_vs_mpi"]["auto"] for r in rows if r["bytes"] < LARGE]
    summary = {"bench": "allreduce", "ranks": p, "ratio": geomean(big), "ratio_small": geomean(small),
               "ratio_ring": geomean([r["speed_vs_mpi"]["ring"] for r in rows if r["bytes"] >= LARGE])
               if "ring" in ours else None,
               "memcpy_bandwidth": ceiling, "auto_threshold_bytes": AUTO_THRESHOLD_BYTES,
               "repeats": args.repeats, "sizes": rows}
    ratio_text = "n/a" if summary["ratio"] is None else f"{summary['ratio']:.2f}"
    small_text = "n/a" if summary["ratio_small"] is None else f"{summary['ratio_small']:.2f}"
    rprint(f"# speed vs MPI (auto): {ratio_text} for sizes >= 1 MiB, {small_text} below")
    if comm.Get_rank() == 0:
        emit_json(summary, args.json)
    return 0

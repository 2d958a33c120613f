""""auto": a rule over the others, by message size: recursive doubling below THRESHOLD_BYTES,
the ring from there on.

Below the threshold rd's log2(P) exchanges beat the ring's 2(P-1) steps; above it the ring's
smaller volume per rank (2(P-1)/P n vs log2(P) n) wins. Measured at P=4 on 2 shared cores
(`mpiexec -n 4 python -m llmpi.bench allreduce`, BENCHMARKS.md): rd ahead at 256 KiB, even at
1 MiB, ring ahead from 4 MiB. The latency/bandwidth model puts the crossover at about
alpha/beta * (2(P-1) - log2 P) / (log2 P - 2(P-1)/P), i.e. it grows with P.
"""
from . import recursive_doubling, ring

HOST_ONLY = True
THRESHOLD_BYTES = 1 << 20


def choose(nbytes):
    """The module that reduces a message of nbytes."""
    return recursive_doubling if nbytes < THRESHOLD_BYTES else ring


def start(view, comm, blocking=False, **options):
    return choose(view.nbytes).start(view, comm, blocking, **options)


def finish(handle):
    pass

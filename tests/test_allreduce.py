"""All-reduce algorithms against MPI_Allreduce at every world size 1..size.

Runs under plain pytest (one rank) and `mpiexec -n 4 python -m pytest --with-mpi`.
Sizes 1..P are tested inside one run through comm.Split subcommunicators. Checks are
turned into flags that every rank agrees on before asserting, so one rank's failure
never leaves the others waiting in a collective.
"""
import numpy as np
import pytest
from mpi4py import MPI

from llmpi.comm.allreduce import allreduce_sum
from llmpi.comm.buckets import Allreducer
from llmpi.comm.world import world
from mpi_helpers import agreed, subcomms

ALGS = ["ring", "rd", "auto"]


def identical_everywhere(x, comm):
    """Every rank of comm holds the same bytes as x."""
    rows = np.empty((comm.Get_size(), x.size), dtype=x.dtype)
    comm.Allgather(x, rows)
    return all(rows[i].tobytes() == x.tobytes() for i in range(comm.Get_size()))


def sizes_for(p):
    return sorted({0, 1, 2, 3, max(p - 1, 0), p + 1, 1000, 12345, 1 << 18})


def local_data(n, dtype, rank, seed=0):
    return np.random.default_rng([seed, n, rank]).standard_normal(n).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", ALGS)
def test_matches_mpi_and_bitwise_identical(algorithm, dtype):
    comm = world()
    failures = []
    for p, sub in subcomms(comm):
        if sub == MPI.COMM_NULL:
            continue
        for n in sizes_for(p):
            x = local_data(n, dtype, sub.Get_rank())
            ref = x.copy()
            sub.Allreduce(MPI.IN_PLACE, ref, op=MPI.SUM)
            allreduce_sum(x, sub, algorithm)
            tol = 1e-5 if dtype == np.float32 else 1e-12
            if not (np.allclose(x, ref, rtol=tol, atol=tol * p) and identical_everywhere(x, sub)):
                failures.append((p, n))
    assert agreed(not failures, comm), f"rank {comm.Get_rank()} failed (P, n): {failures}"


# Explicit ids: pytest-mpi treats a test whose keywords include a bare "mpi" as marked.
@pytest.mark.parametrize("algorithm", ALGS + ["mpi"], ids=lambda a: f"alg_{a}")
def test_integer_valued_sums_are_exact(algorithm):
    comm = world()
    ok = True
    for p, sub in subcomms(comm):
        if sub == MPI.COMM_NULL:
            continue
        x = np.arange(777, dtype=np.float32) * (sub.Get_rank() + 1)
        allreduce_sum(x, sub, algorithm)
        ok &= np.array_equal(x, np.arange(777, dtype=np.float32) * (p * (p + 1) // 2))
    assert agreed(ok, comm)


@pytest.mark.parametrize("algorithm", ["ring", "rd"])
def test_segmented_path(algorithm):
    """Tiny segments: many messages per step, uneven last segments, odd P."""
    comm = world()
    failures = []
    for p, sub in subcomms(comm):
        if sub == MPI.COMM_NULL:
            continue
        for n, seg in ((12345, 64), (1000, 12), (7, 4), (p + 1, 4)):
            x = local_data(n, np.float64, sub.Get_rank(), seed=1)
            ref = x.copy()
            sub.Allreduce(MPI.IN_PLACE, ref, op=MPI.SUM)
            allreduce_sum(x, sub, algorithm, segment_bytes=seg)
            if not (np.allclose(x, ref, rtol=1e-12, atol=1e-12) and identical_everywhere(x, sub)):
                failures.append((p, n, seg))
    assert agreed(not failures, comm), failures


@pytest.mark.parametrize("algorithm", ["mpi", "ring", "auto"], ids=lambda a: f"alg_{a}")
@pytest.mark.parametrize("bucket_bytes", [0, 4000])
def test_allreducer_buckets_and_overlap_equal_one_shot(algorithm, bucket_bytes):
    comm = world()
    n = 10007
    x = local_data(n, np.float32, comm.Get_rank(), seed=2)
    one_shot = x.copy()
    allreduce_sum(one_shot, comm, algorithm)

    bucketed = x.copy()
    red = Allreducer(comm, algorithm, bucket_bytes=bucket_bytes)
    red.reduce(bucketed)

    # Spans arrive back to front, as a backward pass produces them.
    overlapped = x.copy()
    red_o = Allreducer(comm, algorithm, bucket_bytes=bucket_bytes, overlap=True)
    cuts = [0, 1, 500, 501, 3000, 9000, n]
    for lo, hi in reversed(list(zip(cuts[:-1], cuts[1:]))):
        red_o.start(overlapped, lo, hi)
    red_o.wait_all()

    tol = dict(rtol=1e-5, atol=1e-5)
    ok = np.allclose(bucketed, one_shot, **tol) and np.allclose(overlapped, one_shot, **tol)
    ok &= red.comm_seconds >= 0 and red_o.comm_seconds >= 0
    if bucket_bytes == 0:
        ok &= np.array_equal(bucketed, one_shot)
    assert agreed(ok, comm)


def test_rejects_bad_input():
    comm = world()
    with pytest.raises(ValueError):
        allreduce_sum(np.ones(4), comm, "tree")
    with pytest.raises(ValueError):
        Allreducer(comm, "tree")
    with pytest.raises(ValueError):
        allreduce_sum(np.ones((2, 2)), comm, "ring")
    with pytest.raises(ValueError):
        allreduce_sum(np.ones(4, dtype=np.int64), comm, "ring")


@pytest.mark.mpi(min_size=2)
def test_many_steps_large_buffer_across_world():
    """A buffer larger than the default segment, on the full world."""
    comm = world()
    n = (3 << 20) // 4 + 5
    x = local_data(n, np.float32, comm.Get_rank(), seed=3)
    ref = x.copy()
    comm.Allreduce(MPI.IN_PLACE, ref, op=MPI.SUM)
    allreduce_sum(x, comm, "ring")
    ok = np.allclose(x, ref, rtol=1e-5, atol=1e-5) and identical_everywhere(x, comm)
    assert agreed(ok, comm)


def test_ring_halves_are_a_reduce_scatter_and_an_all_gather():
    """reduce_scatter leaves each rank the exact sum of its owned span (and the spans tile the
    buffer); all_gather then fills every span from its owner: together the ring all-reduce,
    bitwise (the same additions in the same order)."""
    from llmpi.comm.allreduce import ring
    comm = world()
    ok = True
    for p, sub in subcomms(comm):
        if sub == MPI.COMM_NULL:
            continue
        for n in (0, 1, p + 1, 1000, 12345):
            x = np.random.default_rng([n, sub.Get_rank()]).integers(-50, 50, n).astype(np.float64)
            total = x.copy()
            sub.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
            lo, hi = ring.reduce_scatter(x, sub, segment_bytes=512)
            ok &= (lo, hi) == ring.owned_span(n, sub.Get_rank(), p) and np.array_equal(x[lo:hi], total[lo:hi])
            spans = sub.allgather((lo, hi))
            ok &= sorted(spans)[0][0] == 0 and sum(b - a for a, b in spans) == n
            x[:lo] = np.nan  # everything outside the owned span must come from its owner
            x[hi:] = np.nan
            ring.all_gather(x, sub, segment_bytes=512)
            whole = np.random.default_rng([n, sub.Get_rank()]).integers(-50, 50, n).astype(np.float64)
            allreduce_sum(whole, sub, "ring", segment_bytes=512)
            ok &= np.array_equal(x, total) and x.tobytes() == whole.tobytes()
    assert agreed(ok, comm)


def test_every_registered_algorithm_is_a_job_choice():
    from llmpi import config
    from llmpi.comm.allreduce import ALGORITHMS
    assert config.CHOICES["parallel.allreduce"] == tuple(ALGORITHMS)
    assert {"mpi", "ring", "rd", "auto", "nccl"} <= set(ALGORITHMS)
    for name, module in ALGORITHMS.items():
        assert callable(module.start) and callable(module.finish) and isinstance(module.HOST_ONLY, bool), name

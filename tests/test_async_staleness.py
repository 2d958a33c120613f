"""Staleness accounting of the async mode in a scripted interleaving.

The trainer's protocol: pull reads the version (v_pull), push takes a ticket with
fetch_add(1); staleness = ticket - v_pull = updates applied by others in between.
Barriers script the order so the expected staleness of every push is known.
"""
import numpy as np
from mpi4py import MPI

from llmpi.comm.rma import ShardedWindow, VersionCounter

COMM = MPI.COMM_WORLD


def test_scripted_interleaving_gives_exact_staleness():
    P, r = COMM.size, COMM.rank
    counter = VersionCounter(COMM)
    window = ShardedWindow(COMM, 8, np.float64)
    # Round 1: everyone pulls at version 0, then ranks push one at a time in rank order.
    COMM.Barrier()
    v_pull = counter.read()
    COMM.Barrier()
    staleness = None
    for turn in range(P):
        if turn == r:
            ticket = counter.fetch_add(1)
            window.accumulate(np.full(8, 1.0))
            staleness = ticket - v_pull
        COMM.Barrier()
    # Round 2: rank P-1 pulls first, then everyone else pushes, then it pushes last.
    last = P - 1
    second = None
    if r == last:
        v_pull = counter.read()
    COMM.Barrier()
    for turn in list(range(last)) + [last]:
        if turn == r:
            if r != last:
                v_pull = counter.read()
            second = counter.fetch_add(1) - v_pull
            window.accumulate(np.full(8, 1.0))
        COMM.Barrier()
    total = np.empty(8)
    window.get(total)
    firsts, seconds = COMM.allgather(staleness), COMM.allgather(second)
    final = counter.read()
    COMM.Barrier()
    window.free()
    counter.free()
    assert firsts == list(range(P))
    assert seconds == [0] * (P - 1) + [P - 1]
    assert final == 2 * P
    assert (total == 2 * P).all()


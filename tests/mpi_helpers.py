"""Helpers for tests that run at every world size inside one MPI run.

Checks become flags that every rank agrees on before asserting, so one rank's
failure never leaves the others waiting in a collective.
"""
import numpy as np
from mpi4py import MPI


def first_ranks(comm, p):
    """A communicator of comm's first p ranks (collective); COMM_NULL on the others."""
    return comm.Split(0 if comm.Get_rank() < p else MPI.UNDEFINED, comm.Get_rank())


def subcomms(comm):
    """(P, sub) for P = 1..size; sub is COMM_NULL on ranks outside the first P."""
    for p in range(1, comm.Get_size() + 1):
        sub = first_ranks(comm, p)
        yield p, sub
        if sub != MPI.COMM_NULL:
            sub.Free()


def agreed(ok, comm):
    """True on every rank iff ok on every rank (a collective: call it on all ranks)."""
    flag = np.array([1 if ok else 0], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MIN)
    return bool(flag[0])

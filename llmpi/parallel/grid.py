"""The ranks as a grid of D data replicas x S pipeline stages (world = D x S).

`slots[d][s]` is the world rank that runs stage s of replica d: by default d * S + s (the stages
of a replica on neighbouring ranks, so on one node where possible), or any placement the
allocator chose (llmpi.parallel.partition). Two families of communicators come from
`Comm.Split` on that table:
  pipeline  the S ranks of one replica, ordered by stage: activations go forward and their
            gradients back between neighbours (llmpi.comm.p2p);
  data      the D ranks that hold the same stage: its gradient buffer is all-reduced there,
            exactly as the whole model's is in plain data parallelism.
"""
from dataclasses import dataclass

from ..errors import UserError


def default_slots(D, S):
    return [[d * S + s for s in range(S)] for d in range(D)]


def check_shape(world, S, n_layer):
    """D = world / S, or a UserError naming what does not divide or fit (same verdict on every rank)."""
    if S < 1:
        raise UserError(f"parallel.pipeline must be >= 1 (got {S})")
    if world % S:
        raise UserError(f"parallel.pipeline = {S} does not divide the {world} ranks; run a multiple of {S} "
                        f"ranks or choose a pipeline size that divides {world}")
    if S > n_layer:
        raise UserError(f"parallel.pipeline = {S} stages exceed the {n_layer} blocks (model.n_layer); "
                        f"use at most {n_layer} stages")
    return world // S


@dataclass
class Grid:
    comm: object  # the job's communicator (world)
    D: int
    S: int
    replica: int  # d of this rank
    stage: int  # s of this rank
    pipeline: object  # communicator of this replica's stages, rank = stage
    data: object  # communicator of this stage's replicas, rank = replica
    slots: list

    @property
    def first(self):
        return self.stage == 0

    @property
    def last(self):
        return self.stage == self.S - 1

    def free(self):
        for c in (self.pipeline, self.data):
            c.Free()


def make_grid(comm, S, slots=None):
    """Split `comm` into the grid (collective). slots: D lists of S world ranks, or None."""
    world = comm.Get_size()
    D = world // S
    slots = slots or default_slots(D, S)
    where = {r: (d, s) for d, row in enumerate(slots) for s, r in enumerate(row)}
    if sorted(where) != list(range(world)):
        raise ValueError(f"slots {slots} must place each of the {world} ranks exactly once")
    d, s = where[comm.Get_rank()]
    pipeline = comm.Split(color=d, key=s)
    data = comm.Split(color=s, key=d)
    return Grid(comm, D, S, d, s, pipeline, data, slots)

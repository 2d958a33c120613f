"""The ranks as a grid of D data replicas x S pipeline stages x K tensor shards (world = D S K).

`ranks[d][s][k]` is the world rank that holds shard k of stage s of replica d: by default
(d S + s) K + k (a stage's shards on neighbouring ranks, since they talk most, then the stages of
a replica: on one node where possible), or, with K = 1, any placement the allocator chose
(`slots[d][s]`, llmpi.parallel.partition). Three families of communicators come from
`Comm.Split` on that table:
  tensor    the K ranks of one stage of one replica, ordered by shard: the all-reduces of the
            tensor-parallel layers (llmpi.parallel.tensor);
  pipeline  the S ranks of one replica with the same shard, ordered by stage: activations go
            forward and their gradients back between neighbours (llmpi.comm.p2p);
  data      the D ranks that hold the same shard of the same stage: its gradient buffer is
            all-reduced there, exactly as the whole model's is in plain data parallelism.
"""
from dataclasses import dataclass

from ..errors import UserError


def default_slots(D, S):
    return [[d * S + s for s in range(S)] for d in range(D)]


def check_shape(world, S, n_layer, K=1):
    """D = world / (S K), or a UserError naming what does not divide or fit (same verdict on every rank)."""
    if S < 1:
        raise UserError(f"parallel.pipeline must be >= 1 (got {S})")
    if K < 1:
        raise UserError(f"parallel.tensor must be >= 1 (got {K})")
    if world % (S * K):
        what = f"parallel.pipeline x parallel.tensor = {S} x {K}" if K > 1 else f"parallel.pipeline = {S}"
        raise UserError(f"{what} does not divide the {world} ranks; run a multiple of {S * K} "
                        f"ranks or choose a grid whose size divides {world}")
    if S > n_layer:
        raise UserError(f"parallel.pipeline = {S} stages exceed the {n_layer} blocks (model.n_layer); "
                        f"use at most {n_layer} stages")
    return world // (S * K)


@dataclass
class Grid:
    comm: object  # the job's communicator (world)
    D: int
    S: int
    replica: int  # d of this rank
    stage: int  # s of this rank
    pipeline: object  # communicator of this replica's stages (same shard), rank = stage
    data: object  # communicator of this shard's replicas, rank = replica
    slots: list  # slots[d][s]: the rank of shard 0 of stage s of replica d
    K: int = 1
    shard: int = 0  # k of this rank
    tensor: object = None  # communicator of this stage's shards, rank = shard
    ranks: list = None  # ranks[d][s][k]

    @property
    def first(self):
        return self.stage == 0

    @property
    def last(self):
        return self.stage == self.S - 1

    def replica_ranks(self, d):
        """Every rank of replica d: its stages' shards."""
        return [r for row in self.ranks[d] for r in row]

    def free(self):
        for c in (self.pipeline, self.data, self.tensor):
            c.Free()


def make_grid(comm, S, slots=None, K=1):
    """Split `comm` into the grid (collective). slots: D lists of S world ranks (K = 1), or None."""
    world = comm.Get_size()
    D = world // (S * K)
    if slots is not None and K > 1:
        raise ValueError("a placement of stages (slots) is for grids without tensor parallelism")
    slots = slots or default_slots(D, S)
    ranks = [[[r * K + k for k in range(K)] for r in row] for row in slots]
    where = {r: (d, s, k) for d, row in enumerate(ranks) for s, group in enumerate(row) for k, r in enumerate(group)}
    if sorted(where) != list(range(world)):
        raise ValueError(f"slots {slots} must place each of the {world} ranks exactly once")
    d, s, k = where[comm.Get_rank()]
    tensor = comm.Split(color=d * S + s, key=k)
    pipeline = comm.Split(color=d * K + k, key=s)
    data = comm.Split(color=s * K + k, key=d)
    return Grid(comm, D, S, d, s, pipeline, data, [[group[0] for group in row] for row in ranks], K, k, tensor,
                ranks)

"""The grid planner: D x S x K, ZeRO-1 on or off, and the layer partition of least predicted step
time under every rank's memory (parallel.grid = "auto"; `python -m llmpi.plan --grid auto`).

Every grid whose size is the world (S <= n_layer, K dividing n_head) and every ZeRO setting is a
candidate; each reduces to the pipeline problem of llmpi.parallel.partition, which solves it
exactly (the partition, and for K = 1 which rank runs which stage):
- a unit is one tensor group, the K consecutive ranks [g K, (g + 1) K) (llmpi.parallel.grid
  places the shards so); the world is D S units on the default slots when K > 1;
- its times per micro-batch of b sequences come from the profile at b0 sequences (one profile for
  all grids), scaled by b / b0 (the work is linear in the tokens) and split K ways, at the pace of
  the group's slowest rank: block = max_k block_time / K + 4 all-reduces of (b, T, C) (two forward,
  two backward: llmpi.parallel.tensor); embedding / K + 1 of (b, T, C); head / K + 1 of (b, T, C)
  + 3 of (b, T) (the vocab-parallel cross-entropy). The LayerNorms are replicated, not split: they
  are ~1% of a block's work, so this is an approximation the measured step (bench tensor) checks;
- the all-reduce rate is measured once over the whole world (MPI_Allreduce) and scaled to p ranks
  by the ring's 2 (p - 1) / p bytes moved per byte; the sync term (data all-reduce + optimizer)
  uses it for the D replicas and, with ZeRO-1, 1/D of the optimizer's time (each rank steps its slice);
- memory: the shards' parameter bytes (their layout), activations at K
  (llmpi.model.gpt.block_activation_bytes), and per parameter byte params + grads + the optimizer
  state, the last / D with ZeRO-1; each unit offers its smallest rank's limit.
A candidate the trainer would refuse (a micro-batch count its share cannot take, a key that does
not combine with model parallelism) is listed with the reason. `rank` orders the candidates:
those that fit first, then by predicted step. No MPI here: the runtime profiles (llmpi.parallel.profile).
"""
import copy
import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..model.gpt import DTYPES, block_activation_bytes, head_activation_bytes
from ..model.stages import block_layout, embedding_layout, head_layout
from . import partition
from .allocate import even_split
from .pipeline import micro_batch_count
from .tensor import shard_shape

GRIDS = ("fixed", "auto")  # parallel.grid: the job's pipeline x tensor as given, or the planner's


@dataclass
class GridPlan:
    D: int
    S: int
    K: int
    zero: int
    micro_batches: int = 0
    micro_batch: int = 0  # sequences per micro-batch (the largest replica share's)
    plan: object = None  # the partition.Plan over units (tensor groups); None when refused
    reason: str = ""  # why it cannot run, when it cannot

    @property
    def fits(self):
        return self.plan is not None and all(self.plan.fits)

    @property
    def step_time(self):
        return self.plan.step_time if self.fits else math.inf

    @property
    def label(self):
        return f"{self.D}x{self.S}x{self.K}" + (" zero-1" if self.zero else "")

    def partition_text(self):
        return ",".join(map(str, self.plan.blocks))

    def stage_ranks(self):
        """Per stage, the world ranks that run it (every shard of every replica)."""
        return [[row[s] * self.K + k for row in self.plan.slots for k in range(self.K)] for s in range(self.S)]

    def to_dict(self):
        return {"D": self.D, "S": self.S, "K": self.K, "zero": self.zero, "micro_batches": self.micro_batches,
                "step_time": None if math.isinf(self.step_time) else self.step_time, "fits": self.fits,
                "reason": self.reason, "plan": self.plan.to_dict() if self.plan else None}


def shapes(world, n_layer, n_head):
    """Every (D, S, K) whose size is `world`, S <= n_layer and K dividing n_head."""
    return [(world // (S * K), S, K) for S in range(1, min(world, n_layer) + 1) for K in range(1, world + 1)
            if world % (S * K) == 0 and n_head % K == 0]


def _nbytes(layout, K, itemsize):
    return float(sum(int(np.prod(shard_shape(name, shape, K))) for name, shape in layout) * itemsize)


def _ring_rate(world_rate, world, p):
    return 0.0 if p == 1 or world == 1 else world_rate * ((p - 1) / p) / ((world - 1) / world)


def grid_costs(prof, cfg, b0, D, S, K, zero, micro):
    """The partition.PipelineCosts of the D S tensor groups of grid D x S x K (module docstring);
    prof: a llmpi.parallel.profile.Profile measured at b0 sequences per micro-batch."""
    P, L = len(prof.ranks), cfg.n_layer
    itemsize = np.dtype(DTYPES[cfg.dtype]).itemsize
    scale, tokens = micro / b0, micro * cfg.block_size
    act = tokens * cfg.n_embd * itemsize  # one (b, T, C)
    tp = _ring_rate(max(r.allreduce_rate for r in prof.ranks), P, K)
    dp = _ring_rate(max(r.allreduce_rate for r in prof.ranks), P, D)
    groups = [prof.ranks[g * K:(g + 1) * K] for g in range(D * S)]
    slowest = [{f: max(getattr(r, f) for r in grp) for f in ("block_time", "embedding_time", "head_time",
                                                              "optimizer_rate")} for grp in groups]
    factor = max(r.state_factor for r in prof.ranks)  # params + grads + the optimizer's arrays
    send = max(r.send_time for r in prof.ranks) * scale
    embedding_bytes = _nbytes(embedding_layout(cfg), K, itemsize)
    tied = _nbytes(embedding_layout(cfg)[:1], K, itemsize)
    return partition.PipelineCosts(
        block_time=[[g["block_time"] * scale / K + 4 * act * tp] * L for g in slowest],
        embedding_time=[g["embedding_time"] * scale / K + act * tp for g in slowest],
        head_time=[g["head_time"] * scale / K + (act + 3 * tokens * itemsize) * tp for g in slowest],
        block_param_bytes=_nbytes(block_layout(cfg, 0), K, itemsize), embedding_param_bytes=embedding_bytes,
        head_param_bytes=_nbytes(head_layout(cfg), K, itemsize), tied_param_bytes=tied,
        block_activation_bytes=float(block_activation_bytes(cfg, K) * tokens),
        head_activation_bytes=float(head_activation_bytes(cfg, K) * tokens), send_time=send,
        sync_rate=[g["optimizer_rate"] / (D if zero else 1) + dp for g in slowest],
        tied_time=send / act * tied, state_factor=2 + (factor - 2) / D if zero else factor)


def _shape_of_job(job, D, S, K, zero, validate):
    """(micro-batches, sequences per micro-batch) the trainer would use on this grid, or a UserError."""
    trial = copy.deepcopy(job)
    p, B = trial.parallel, trial.train.batch_size
    p.pipeline, p.tensor, p.zero, p.grid, p.partition = S, K, zero, "fixed", "uniform"
    validate(trial)
    shares = even_split(D, B)
    if S == K == 1:  # the data-parallel loop: the whole share at once, or train.micro_batch at a time
        share = max(shares)
        micro = min(trial.train.micro_batch or share, share)
        return -(-share // micro), micro
    m = micro_batch_count(p.micro_batches, min(shares), S, B)
    return m, -(-max(shares) // m)


def evaluate(prof, job, b0, D, S, K, zero, memory_limit, validate):
    """The GridPlan of one candidate: its exact best partition (and placement for K = 1)."""
    out = GridPlan(D, S, K, zero)
    try:
        out.micro_batches, out.micro_batch = _shape_of_job(job, D, S, K, zero, validate)
        costs = grid_costs(prof, job.model, b0, D, S, K, zero, out.micro_batch)
        limit = None if memory_limit is None else [min(memory_limit[g * K:(g + 1) * K]) for g in range(D * S)]
        out.plan = partition.optimal(costs, S, out.micro_batches, job.parallel.schedule, limit, placed=K > 1)
    except UserError as err:
        out.reason = str(err)
    return out


def rank(prof, job, b0, memory_limit=None, validate=None):
    """Every candidate grid, best first (fits, then predicted step, then fewer stages and shards);
    `validate(job)` raises the trainer's UserError for a job it refuses (llmpi.config.validate)."""
    world = len(prof.ranks)
    cands = [evaluate(prof, job, b0, D, S, K, zero, memory_limit, validate or (lambda j: None))
             for D, S, K in shapes(world, job.model.n_layer, job.model.n_head) for zero in ((0, 1) if D > 1 else (0,))]
    return sorted(cands, key=lambda c: (not c.fits, c.step_time, c.S * c.K, c.zero))


def choose(ranked, world):
    """The best candidate, or a UserError saying why none can run."""
    if ranked and ranked[0].fits:
        return ranked[0]
    split = ranked[-1] if ranked else None  # the most split grid: the least memory per rank
    why = f" (the most split grid, {split.label}: {split.reason or 'does not fit memory'})" if split else ""
    raise UserError(f"no grid of the {world} ranks can run this job{why}; raise parallel.memory_limit_mb, "
                    "use more ranks or a smaller model")

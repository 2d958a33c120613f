"""Pipeline-parallel training: the ranks form D data replicas x S stages (llmpi.parallel.grid);
each rank holds blocks [a, b) of the GPT with its own flat buffers (the first stage also the
embedding, the last ln_f and the LM head with a tied copy of wte).

One step: the replica's share of the batch, cut into micro-batches, runs through the stages in
the schedule's order (llmpi.parallel.pipeline); the first and the last stage sum their wte
gradients (the tied LM head, as Megatron does); each stage's buffer is all-reduced in its data
group with any registered algorithm, sample-weighted as in data parallelism; the gradient is
clipped by the global norm over the stages (wte counted once); every stage applies the optimizer
to its own buffer. Checkpoints hold each stage's part under the HF names (llmpi.training.run).
"""
import math
import os
import time

import h5py
import numpy as np
from mpi4py import MPI

from ..comm.buckets import Allreducer
from ..comm.device import device_direct
from ..comm.p2p import FORWARD, Channel, exchange_add, tag
from ..comm.world import agree, rprint
from ..data import get_batch
from ..errors import UserError
from ..model.gpt import DTYPES, block_activation_bytes, head_activation_bytes, stage_layout
from .. import config as config_mod
from ..parallel import partition
from ..parallel.allocate import even_split
from ..parallel.grid import check_shape, make_grid
from ..parallel.partition import parse_partition
from ..parallel.pipeline import StageStep, micro_batch_count, micro_batch_sizes, peak_in_flight
from ..parallel.profile import profile
from ..parallel.tensor import TensorGroup, replicated
from .metrics import Progress
from .optim import make_optimizer, schedule_lr
from .run import Run
from .signals import disarms_watchdog

TIMELINE_STEPS = 3  # steps recorded for `llmpi.compare --timeline`, after the first (warm-up) one
EVENT_KINDS = ("F", "B", "wait", "allreduce", "optimizer")


def stage_bounds(spec, n_layer, S):
    """parallel.partition "uniform" or "a,b,c" -> [(first, last)] blocks per stage."""
    counts = even_split(S, n_layer) if spec == "uniform" else parse_partition(spec, n_layer, S)
    return _bounds(counts)


def _bounds(counts):
    edges = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
    return list(zip(edges[:-1], edges[1:]))


class PipelineRun(Run):
    """A run whose rank holds one pipeline stage of one data replica."""

    def _layout(self):
        job, p = self.job, self.job.parallel
        S, K = p.pipeline, p.tensor
        self.stages = S
        D = agree(lambda: check_shape(self.world, S, job.model.n_layer, K), self.comm)
        shares = even_split(D, job.train.batch_size)
        self.micro_batches = agree(lambda: micro_batch_count(p.micro_batches, min(shares), S, job.train.batch_size),
                                   self.comm)
        self.plan, slots = None, None
        if p.partition == "auto":  # measure every rank, then the allocator's exact plan
            agree(lambda: _auto_needs_whole_layers(K), self.comm)
            self.plan = self._auto_plan(S, -(-max(shares) // self.micro_batches))
            bounds, slots = _bounds(self.plan.blocks), self.plan.slots
        else:
            bounds = agree(lambda: stage_bounds(p.partition, job.model.n_layer, S), self.comm)
        self.grid = make_grid(self.comm, S, slots, K)
        self.tensor = TensorGroup(self.grid.tensor) if K > 1 else None
        self.stage, self.bounds = self.grid.stage, bounds
        self.data_rank, self.data_world = self.grid.replica, self.grid.D
        self.blocks = bounds[self.stage]

    def _auto_plan(self, S, micro):
        """Profile this rank (llmpi.parallel.profile, --slowdown applied) and solve the partition and
        the placement of ranks exactly (llmpi.parallel.partition) under parallel.memory_limit_mb."""
        job = self.job
        limits = [v * 2**20 for v in config_mod.memory_limits_mb(job.parallel.memory_limit_mb)]
        limit = (limits * self.world if len(limits) == 1 else limits) or None
        prof = profile(self.comm, job.model, micro, S,
                       lambda params, ops: make_optimizer(job.optim, params, ops), self.xp, slowdown=self.slowdown)
        return agree(lambda: partition.optimal(prof.costs(), S, self.micro_batches, job.parallel.schedule, limit),
                     self.comm)

    def _replica_ranks(self):
        return [row[0] for row in self.grid.slots]  # stage 0 draws the replica's samples

    def _saved_names(self):
        """The tied copy of wte is the first stage's; a replicated parameter is shard 0's."""
        names = self.model.params.names
        if self.grid.last and self.stages > 1:
            names = [n for n in names if n != "wte"]
        return [n for n in names if self.grid.shard == 0 or not replicated(n)]

    def state_bytes(self):
        """Parameters, gradients and optimizer state of this rank's shard of its stage."""
        layout = stage_layout(self.job.model, *self.blocks)
        if self.tensor:
            layout = self.tensor.layout(layout)
        return self._state_bytes(sum(math.prod(shape) for _, shape in layout) * np.dtype(DTYPES[self.job.model.dtype]).itemsize)

    def data_comm(self):
        return self.grid.data

    def activation_bytes(self):
        """What this stage keeps for backward at its schedule's peak (for the memory check)."""
        j = self.job
        share = -(-j.train.batch_size // self.data_world)
        micro = -(-share // self.micro_batches)  # the largest micro-batch
        in_flight = peak_in_flight(j.parallel.schedule, self.stages, self.stage, self.micro_batches)
        first, last = self.blocks
        per_token = block_activation_bytes(j.model, self.grid.K) * (last - first)
        if self.grid.last:
            per_token += head_activation_bytes(j.model, self.grid.K)
        return per_token * micro * j.model.block_size * in_flight

    def describe(self):
        if self.plan is not None:  # the prediction beside the measured step times of metrics.h5
            self.metrics.attrs.update(plan_step_s=self.plan.step_time, plan_bubble=self.plan.bubble)
        super().describe()
        counts = [b - a for a, b in self.bounds]
        shards = f" x {self.grid.K} tensor shards (vocab-parallel embedding and head)" if self.grid.K > 1 else ""
        rprint(f"grid: {self.grid.D} replica(s) x {self.stages} stage(s){shards}, blocks per stage {counts}, "
               f"{self.micro_batches} micro-batches, schedule {self.job.parallel.schedule}")
        if self.plan is not None:
            rprint(f"plan (auto): ranks per stage {[[row[s] for row in self.plan.slots] for s in range(self.stages)]}, "
                   f"predicted step {1e3 * self.plan.step_time:.1f} ms, bubble {100 * self.plan.bubble:.0f}%"
                   + ("" if self.plan.exact else " (heuristic search)"))

    def val_loss(self, eval_index):
        """This replica's mean val loss over eval_iters batches, forward through the stages (on the
        last stage; 0 on the others)."""
        j, model, grid = self.job, self.model, self.grid
        n = max(1, -(-j.train.batch_size // self.data_world))
        channel = self.channel()
        weights, total = model.weights.refresh(), 0.0
        for i in range(j.train.eval_iters):
            x = y = None
            if grid.first or grid.last:
                starts = self.val_sampler.val_starts(eval_index * j.train.eval_iters + i, n)
                x, y = get_batch(self.tokens.val, starts, j.model.block_size, self.xp)
            if grid.first:
                h, _ = model.embedding.forward(x)
            else:
                h = self.xp.empty((n, j.model.block_size, j.model.n_embd), dtype=model.activation_dtype)
                h = channel.wait(channel.post_recv(h, grid.stage - 1, tag(i, FORWARD)))
            h, _ = model.blocks.forward(h, weights)
            if grid.last:
                total += model.head.loss(h, model.weights.head, y)
            else:
                channel.send(h, grid.stage + 1, tag(i, FORWARD))
                channel.wait_sends()
        return total / j.train.eval_iters if grid.last and grid.shard == 0 else 0.0

    def channel(self):
        direct = device_direct(self.job.parallel.cuda_aware_mpi)
        return Channel(self.grid.pipeline, time.perf_counter, direct)

    def evaluate(self, eval_index):
        mean = np.array([self.val_loss(eval_index)])
        self.comm.Allreduce(MPI.IN_PLACE, mean)  # only the replicas' last stages (shard 0) contribute
        return float(mean[0]) / self.data_world


@disarms_watchdog
def train_pipeline(run):
    job, comm, grid, model = run.job, run.comm, run.grid, run.model
    B, T, S = job.train.batch_size, job.model.block_size, run.stages
    reducer = Allreducer(grid.data, job.parallel.allreduce, int(job.parallel.bucket_mb * 2**20),
                         cuda_aware_mpi=job.parallel.cuda_aware_mpi)
    stage_step = StageStep(model, grid.pipeline, job.parallel.schedule, run.slowdown,
                           device_direct(job.parallel.cuda_aware_mpi))
    shares = even_split(grid.D, B)
    share, offset = shares[grid.replica], sum(shares[:grid.replica])
    sizes = micro_batch_sizes(share, run.micro_batches)
    own = _own_spans(run)  # the parts of the gradient this rank adds to the global norm
    if job.parallel.zero:
        own = run.optimizer.own_spans(own)
    progress = Progress(job.train.max_iters, run.start_step, run.bytes_per_token)
    timeline = Timeline(run, range(run.start_step + 1, run.start_step + 1 + TIMELINE_STEPS))
    t_origin = time.perf_counter() - run.wall_offset
    samples_seen, step = run.start_step * B, run.start_step
    while step < job.train.max_iters:
        run.check_fault(step)
        lr = schedule_lr(job, step)
        model.params.zero_grad()
        stage_step.record = timeline.start(step)
        t0 = time.perf_counter()
        loss_sum = stage_step.run(_micro_batches(run, step, offset, share, sizes), sizes, B)
        t_pipe = time.perf_counter()
        if S > 1 and (grid.first or grid.last):  # the tied LM head: both copies get the summed gradient
            exchange_add(model.params.grad_views["wte"], S - 1 - grid.stage, grid.pipeline)
        if job.parallel.zero:  # the reduce-scatter: this rank's slice of the summed gradient
            run.optimizer.reduce(model.params.grad)
        else:
            reducer.reduce(model.params.grad)
        t_reduced = time.perf_counter()
        # One small collective carries the loss, the stage's share of the norm, its timings and any stop request.
        if grid.shard:  # every shard of the last stage computed the same loss: count it once
            loss_sum = 0.0
        sumsq = sum(float(model.ops.sumsq(model.params.grad[lo:hi])) for lo, hi in own)
        row = np.array([loss_sum, sumsq, stage_step.compute, t_pipe - t0, float(run.stop.requested)])
        table = np.empty((run.world, row.size))
        comm.Allgather(row, table)
        comm_s = time.perf_counter() - t_pipe
        loss = table[:, 0].sum() / B
        run.check_finite(loss, step + 1)
        if job.optim.grad_clip > 0 and job.parallel.zero:  # the replicas hold disjoint slices
            run.optimizer.clip(model.ops.clip_grad_norm, job.optim.grad_clip, math.sqrt(table[:, 1].sum()))
        elif job.optim.grad_clip > 0:
            norm = math.sqrt(table[grid.replica_ranks(grid.replica), 1].sum())  # every replica holds the same gradient
            model.ops.clip_grad_norm(model.params.grad, job.optim.grad_clip, norm=norm)
        run.optimizer.step(lr)
        bubble = float(np.mean(1.0 - table[:, 2] / np.maximum(table[:, 3], 1e-12)))
        timeline.add(stage_step.events, (("allreduce", -1, t_pipe, t_reduced),
                                         ("optimizer", -1, t_reduced, time.perf_counter())))
        samples_seen += B
        wall = time.perf_counter() - t_origin
        run.metrics.log_step(step=step + 1, wall=wall, loss=loss, lr=lr, tokens=B * T, samples=samples_seen,
                             comm=comm_s, staleness=-1, bubble=bubble)
        progress.add(B * T, comm_s)
        step += 1
        timeline.finish(step)
        line = lambda: progress.line(step - 1, loss, lr, f"bubble {100 * bubble:.0f}%")  # noqa: E731
        if run.end_step(step, wall, samples_seen, line, table[:, 4].any()):
            return 0
    return 0


def _own_spans(run):
    """[(lo, hi)] of the rank's gradient buffer that count towards the global norm: the names it
    saves in checkpoints (not the last stage's tied copy of wte, which the first stage counts, nor,
    on shards k > 0, the replicated parameters, which shard 0 counts), merged where adjacent."""
    params, spans = run.model.params, []
    for name in run._saved_names():
        lo, n = params.spans[name]
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], lo + n)
        else:
            spans.append((lo, lo + n))
    return spans


def _auto_needs_whole_layers(K):
    if K > 1:
        raise UserError("parallel.partition = 'auto' places whole-layer stages; with parallel.tensor > 1 "
                        "give the partition (uniform or a,b,c)")


def _micro_batches(run, step, offset, share, sizes):
    """[(x, y)] of this replica's micro-batches on the stages that read data (first and last, from
    the same sampler), [None] * m elsewhere."""
    if not (run.grid.first or run.grid.last):
        return [None] * len(sizes)
    starts = run.sampler.starts(step, run.job.train.batch_size, offset, share)
    out, lo = [], 0
    for size in sizes:
        out.append(get_batch(run.tokens.train, starts[lo:lo + size], run.job.model.block_size, run.xp))
        lo += size
    return out


class Timeline:
    """Per-rank events of a few steps, for `python -m llmpi.compare --timeline RUN`: rank 0 writes
    runs/NAME/timeline.h5 (rank, step, kind, micro_batch, start, end in seconds from the step's
    common start, taken after a barrier, so the rows line up)."""

    def __init__(self, run, steps):
        self.run, self.steps, self.rows, self.t_ref, self.step = run, set(steps), [], 0.0, None

    def start(self, step):
        if step not in self.steps:
            return False
        self.run.comm.Barrier()
        self.t_ref, self.step = time.perf_counter(), step
        return True

    def add(self, events, phases):
        if self.t_ref:
            for kind, mb, t0, t1 in (*events, *phases):
                self.rows.append((self.run.rank, self.step, EVENT_KINDS.index(kind), mb,
                                  t0 - self.t_ref, t1 - self.t_ref))
            self.t_ref = 0.0

    def finish(self, step):
        if step != max(self.steps) + 1:
            return
        rows = self.run.comm.gather(self.rows, root=0)
        if self.run.is_root:
            table = np.array([r for part in rows for r in part], dtype=np.float64).reshape(-1, 6)
            path = os.path.join(self.run.run_dir, "timeline.h5")
            with h5py.File(path + ".tmp", "w") as f:
                for i, name in enumerate(("rank", "step", "kind", "micro_batch", "start", "end")):
                    f.create_dataset(name, data=table[:, i])
                f.attrs["kinds"] = list(EVENT_KINDS)
                f.attrs["stages"] = self.run.stages
            os.replace(path + ".tmp", path)

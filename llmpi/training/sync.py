"""Synchronous data-parallel training: every step each rank computes the gradient of its share
of the global batch, the shares are summed with an all-reduce (each rank's gradient is already
scaled by its samples / B, so the sum is the sample-weighted average), and every rank applies
the identical optimizer step.
"""
import math
import time

import numpy as np

from ..comm.buckets import Allreducer
from ..comm.world import rprint
from ..data import get_batch
from .graphed import GraphedStep
from .metrics import Progress
from .optim import schedule_lr
from .signals import disarms_watchdog


def micro_chunks(count, micro):
    """Split a rank's `count` samples into micro-batches of at most `micro`."""
    micro = micro or count
    return [min(micro, count - i) for i in range(0, count, micro)] if count else []


@disarms_watchdog
def train_sync(run):
    job, comm, model, xp = run.job, run.comm, run.model, run.xp
    B, T = job.train.batch_size, job.model.block_size
    zero = bool(job.parallel.zero)
    reducer = Allreducer(comm, job.parallel.allreduce, int(job.parallel.bucket_mb * 2**20), job.parallel.overlap,
                         cuda_aware_mpi=job.parallel.cuda_aware_mpi)
    graphed = GraphedStep(model, run.optimizer, B, job.optim.grad_clip, run.capture) \
        if job.train.cuda_graph else None
    progress = Progress(job.train.max_iters, run.start_step, run.bytes_per_token)
    t_origin = time.perf_counter() - run.wall_offset
    samples_seen = run.start_step * B
    step = run.start_step
    while step < job.train.max_iters:
        run.check_fault(step)
        lr = schedule_lr(job, step)
        counts, offsets = run.balancer.counts, run.balancer.offsets
        mine = counts[run.rank]
        model.params.zero_grad()
        comm_before = reducer.comm_seconds
        t0 = time.perf_counter()
        loss_sum, done = 0.0, 0
        chunks = micro_chunks(mine, job.train.micro_batch)
        for i, m in enumerate(chunks):
            starts = run.sampler.starts(step, B, offsets[run.rank] + done, m)
            x, y = get_batch(run.tokens.train, starts, T, xp)
            if graphed:
                graphed.forward_backward(x, y)
                loss = 0.0  # summed on the device: loss_total below
            elif run.threads:
                loss = run.threads.forward_backward(x, y, loss_scale=m / B)
            else:
                _, loss, cache = model.forward(x, y)
                last = i == len(chunks) - 1
                hook = (lambda lo, hi: reducer.start(model.params.grad, lo, hi)) \
                    if (job.parallel.overlap and last) else None
                model.backward(cache, loss_scale=m / B, on_block_done=hook)
            loss_sum += float(loss) * m
            done += m
        if graphed:
            loss_sum = graphed.loss_total()
        if job.parallel.overlap and not chunks:
            for lo, hi in model.grad_spans():  # no samples here: the same buckets as the ranks' backward
                reducer.start(model.params.grad, lo, hi)
        compute = time.perf_counter() - t0 - (reducer.comm_seconds - comm_before)
        if run.slowdown > 1.0:
            time.sleep((run.slowdown - 1.0) * compute)
            compute *= run.slowdown
        t_zero = time.perf_counter()
        if job.parallel.overlap:
            reducer.wait_all()
        elif zero:  # ZeRO-1's reduce-scatter: this rank's slice of the summed gradient
            run.optimizer.reduce(model.params.grad)
        else:
            reducer.reduce(model.params.grad)
        # One small collective carries the loss, this rank's speed, any stop request and (ZeRO-1)
        # its slice's share of the gradient norm.
        t_c = t_zero if zero else time.perf_counter()
        sumsq = float(model.ops.sumsq(run.optimizer.slice.grad)) if zero and job.optim.grad_clip > 0 else 0.0
        row = np.array([loss_sum, compute / max(mine, 1), float(mine), float(run.stop.requested), sumsq])
        table = np.empty((run.world, row.size))
        comm.Allgather(row, table)
        comm_s = reducer.comm_seconds - comm_before + time.perf_counter() - t_c
        loss = table[:, 0].sum() / B
        run.check_finite(loss, step + 1)
        if graphed:
            graphed.update(lr)  # clips on the device
        else:
            if job.optim.grad_clip > 0 and zero:
                run.optimizer.clip(model.ops.clip_grad_norm, job.optim.grad_clip, math.sqrt(table[:, 4].sum()))
            elif job.optim.grad_clip > 0:
                model.ops.clip_grad_norm(model.params.grad, job.optim.grad_clip)
            run.optimizer.step(lr)
        samples_seen += B
        wall = time.perf_counter() - t_origin
        run.metrics.log_step(step=step + 1, wall=wall, loss=loss, lr=lr, tokens=B * T, samples=samples_seen,
                             comm=comm_s, staleness=-1,  # an all-reduce of n bytes: n out and n in per rank
                             comm_bytes=2 * model.params.grad.nbytes * run.world if run.world > 1 else 0)
        progress.add(B * T, comm_s)
        run.balancer.observe([t if c > 0 else 0.0 for t, c in zip(table[:, 1], table[:, 2])])
        if run.balancer.maybe_rebalance(step + 1):
            rprint(f"balance: step {step + 1}: samples per rank {run.balancer.counts}")
        step += 1
        if run.end_step(step, wall, samples_seen, lambda: progress.line(step - 1, loss, lr), table[:, 3].any()):
            return 0
    return 0



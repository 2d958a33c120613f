"""Local SGD (`parallel.mode = "local"`): replicas train apart for H steps, then average.

A round is H = `parallel.local_steps` optimizer steps (the last round may be shorter). In it
every rank r takes its own optimizer steps on its share n_r of each global batch B (the very
samples the synchronous loop would give it at those steps; its gradient is the mean over them,
clipped on the rank), with its own optimizer state. Then, from the round's start w_0:

  Delta = sum_r (n_r / B) (w_r - w_0)        one all-reduce of the flat buffer (parallel.allreduce)
  g = -Delta;  u = mu u + g;  w = w_0 - eta (g + mu u)       the outer step, on every rank alike

with eta = `parallel.outer_lr` and mu = `parallel.outer_momentum`: Nesterov momentum on the
averaged delta as DiLoCo's outer optimizer (Douillard et al. 2023: eta 0.7, mu 0.9); the defaults
eta = 1, mu = 0 give plain averaging, w = w_0 + Delta, exactly. With H = 1, SGD and no clipping
this is the synchronous step (the update is linear in the gradient); communication per sample
falls by H, which metrics.h5 shows in `comm_bytes` (logged on the round's last step).

One small all-reduce per round carries the ranks' losses and any stop request, so evaluation,
checkpoints, signals and a non-finite loss (the run stops before the outer step, naming the
step) happen at round ends, when the replicas agree: the progress line,
evaluation and checkpoint come at the first round end at or after each of their intervals.
Each rank's optimizer state is its own, so checkpoints keep one per rank (as async does).
"""
import time

import numpy as np
from mpi4py import MPI

from .. import backend
from ..comm.buckets import Allreducer
from ..comm.world import agree, rprint
from ..errors import UserError
from .async_rma import local_gradient
from .ckpt_files import latest
from .metrics import Progress, loss_text
from .optim import schedule_lr
from .signals import disarms_watchdog


def outer_step(anchor, delta, momentum_buffer, outer_lr, outer_momentum):
    """The outer Nesterov step in place on `anchor` (w_0) from the averaged delta; returns anchor."""
    grad = -delta
    momentum_buffer *= outer_momentum
    momentum_buffer += grad
    grad += outer_momentum * momentum_buffer
    grad *= outer_lr
    anchor -= grad
    return anchor


def _crossed(before, after, interval):
    """Whether a multiple of `interval` lies in (before, after]."""
    return bool(interval) and after // interval > before // interval


@disarms_watchdog
def train_local(run):
    job, params, xp = run.job, run.model.params, run.xp
    B, T, H = job.train.batch_size, job.model.block_size, job.parallel.local_steps
    p = job.parallel
    reducer = Allreducer(run.comm, p.allreduce, int(p.bucket_mb * 2**20), cuda_aware_mpi=p.cuda_aware_mpi)
    anchor = params.data.copy()
    momentum = xp.zeros_like(params.data)
    agree(lambda: _restore_outer(run, momentum), run.comm)
    progress = Progress(job.train.max_iters, run.start_step, run.bytes_per_token)
    t_origin = time.perf_counter() - run.wall_offset
    step = run.start_step
    while step < job.train.max_iters:
        end = min(step + H, job.train.max_iters)
        count = run.balancer.counts[run.rank]
        loss_sums = np.zeros(end - step + 1)  # this rank's loss x samples per step, then its stop request
        walls = []
        for i, s in enumerate(range(step, end)):
            run.check_fault(s)
            t0 = time.perf_counter()
            if count:  # a rank without samples keeps w_0 and weighs nothing in the average
                loss_sums[i] = local_gradient(run, s, count) * count
                run.optimizer.step(schedule_lr(job, s))
            if run.slowdown > 1.0:
                time.sleep((run.slowdown - 1.0) * (time.perf_counter() - t0))
            walls.append(time.perf_counter() - t_origin)
        loss_sums[-1] = float(run.stop.requested)
        t_c = time.perf_counter()
        delta = params.data - anchor
        delta *= count / B
        reducer.reduce(delta)
        run.comm.Allreduce(MPI.IN_PLACE, loss_sums)
        comm_s = time.perf_counter() - t_c
        for i, s in enumerate(range(step, end)):  # every rank has the same sums: all stop alike
            run.check_finite(loss_sums[i] / B, s + 1)  # before the outer step: w_0 stays the last good weights
        params.data[...] = outer_step(anchor, delta, momentum, p.outer_lr, p.outer_momentum)
        wall = time.perf_counter() - t_origin
        for i, s in enumerate(range(step, end)):
            last = s == end - 1
            run.metrics.log_step(step=s + 1, wall=wall if last else walls[i], loss=loss_sums[i] / B,
                                 lr=schedule_lr(job, s), tokens=B * T, samples=(s + 1) * B,
                                 comm=comm_s if last else 0.0, staleness=-1,
                                 comm_bytes=2 * params.data.nbytes * run.world if last else 0)
            progress.add(B * T, comm_s if last else 0.0)
        before, step = step, end
        if _end_round(run, before, step, wall, loss_sums[-2] / B, progress, loss_sums[-1] > 0, momentum):
            return 0
    return 0


def _restore_outer(run, momentum):
    """The outer momentum of the checkpoint a run resumes from (kept by rank 0: it is the same on
    every rank); the per-rank optimizer states need the ranks that wrote them."""
    ck = run.resume_state
    if ck is None:
        return
    ranks = int(ck.attrs.get("world_size", run.world))
    if ranks != run.world:
        raise UserError(f"local-SGD checkpoint {ck.path} was written by {ranks} ranks (each keeps its own "
                        f"optimizer state); resume it with {ranks} ranks")
    saved = ck.per_rank.get("outer", {}).get(0, {})
    if "momentum" in saved:
        momentum[...] = run.xp.asarray(saved["momentum"]).reshape(momentum.shape)


def _refuse_non_finite(run, step):
    """Weights that overflowed (the loss may still have been finite) are never checkpointed; the
    replicas hold the same weights after the outer step, so every rank decides alike."""
    if not bool(run.xp.isfinite(run.model.params.data).all()):
        kept = latest(run.run_dir)
        raise UserError(f"the weights became non-finite at step {step}; training stopped before checkpointing "
                        f"them{f', {kept} is the last checkpoint' if kept else ''}; lower optim.lr, raise "
                        "schedule.warmup_iters or check the data")


def _end_round(run, before, step, wall, loss, progress, stopping, momentum):
    """Run.end_step for a round that ended at `step`, with each rank's optimizer state in the
    checkpoint. Collective; returns True when the loop ends."""
    t = run.job.train
    done = step == t.max_iters
    if _crossed(before, step, t.log_interval) or done:
        rprint(progress.line(step - 1, loss, schedule_lr(run.job, step - 1), f"round of {step - before} steps"))
    if _crossed(before, step, t.eval_interval) or done:
        val = run.evaluate(step)
        run.metrics.log_eval(step=step, wall=wall, samples=step * t.batch_size, val_loss=val)
        rprint(f"eval: step {step} | {loss_text('val loss', val, run.bytes_per_token)}")
        run.metrics.flush()
    if _crossed(before, step, t.ckpt_interval) or done or stopping:
        _refuse_non_finite(run, step)
        state = {k: backend.to_host(v) for k, v in run.optimizer.state_dict().items()}
        keep_outer = run.is_root and run.job.parallel.outer_momentum > 0
        outer = {"momentum": backend.to_host(momentum)} if keep_outer else None
        run.save(step, extra_per_rank={"optim": state, "outer": outer})
    if stopping:
        rprint(f"stop requested by signal: checkpointed at step {step}, exiting")
    run.watchdog.step_done()
    return bool(stopping)

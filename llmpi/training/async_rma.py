"""Asynchronous data-parallel training on MPI one-sided communication.

The flat parameter vector lives in RMA windows (sharded over all ranks, or on rank 0
with `parallel.server = "rank0"`). Every worker loops without barriers or collectives:

  pull   Get the whole vector under shared locks (passive target);
  work   forward/backward on its own batch, local optimizer (moments stay on the worker);
  push   take a ticket from the global version counter (Fetch_and_op SUM) and add its
         update with Accumulate(SUM), element-wise atomic by the MPI standard.

Staleness of a push = its ticket - the version read at its pull = the number of other
updates applied in between. The run ends when the shared budget of updates,
train.max_iters x world_size, is spent: tickets at or past the budget are not applied,
so exactly that many updates land. Only then do the ranks meet again (barrier), assemble,
evaluate and checkpoint the final parameters.

Periodic checkpoints (`train.ckpt_interval` steps = that many x P versions), with no collective in
the loop: each rank writes its own part (rank{r}_STEP.h5: its optimizer moments, its sampler
position, the samples of its pushes below the boundary) at its first push at or past the
boundary; the rank whose push made the boundary version writes the parameters, a snapshot of the
windows read right after it (pushes still in flight may be in it or not: as in any async read);
the rank whose part completes the set writes the manifest (llmpi.training.checkpoint). A crash
then loses at most ckpt_interval steps, and --resume takes the checkpoint like the final one.
A non-finite loss on any rank ends the job before that update is pushed: the rank raises the
shared stop flag, every rank leaves the loop, and after the barrier all say so in one line.

Learning rate of a push (`parallel.async_lr`): "per_sample" uses lr / P, so P pushes of
batch B/P move the weights as far as one synchronous step of batch B would with SGD;
"sqrt" uses lr / sqrt(P), which suits AdamW better: its update has about the same size
whatever the batch, so P noisy pushes of lr/P partly cancel and undershoot; "full" uses lr;
"auto" (the default) is sqrt for AdamW and per_sample for SGD.

Update rule of a push (`parallel.async_rule`), on top of that scale (the two multiply), with
g the worker's gradient at its pulled parameters w_pulled, s = ticket - v_pull its staleness
and opt(g, lr) its optimizer's update (lr = schedule x push scale):

  plain      w += opt(g, lr)
  staleness  w += opt(g, lr) / (1 + s)                              (Zhang et al. 2016)
  dc         w += opt(g + lambda * g * g * (w_now - w_pulled), lr)  (DC-ASGD, Zheng et al. 2017)

where w_now is the vector read again just before the push and lambda is `parallel.dc_lambda`.
Their cost in messages, per push with the vector on R window ranks (R = P sharded, 1 rank0):
plain pulls (R Get_accumulate + R Flush) and pushes (1 Fetch_and_op + R Accumulate + R Flush);
staleness costs nothing more (the ticket that decides whether the push lands already tells s;
an update is linear in lr, so dividing it after the ticket equals dividing lr); dc adds one more
pull (R Get_accumulate + R Flush: the vector's bytes again) and three element-wise passes.
`max_staleness` (bounded staleness, SSP) is orthogonal: it decides when to recompute, the rule
how far a push moves.
"""
import os
import time

import h5py
import numpy as np

from .. import backend
from ..comm.rma import ShardedWindow, VersionCounter
from ..comm.world import rprint
from ..data import get_batch
from ..errors import UserError
from . import ckpt_files as checkpoint  # not .checkpoint: it imports the config, which imports us
from .metrics import Progress, loss_text
from .optim import schedule_lr
from .signals import disarms_watchdog

# parallel.async_lr: the push's learning-rate scale for P workers ("auto" is resolved per optimizer)
PUSH_SCALES = {"per_sample": lambda P: 1.0 / P, "sqrt": lambda P: P ** -0.5, "full": lambda P: 1.0}
PUSH_RULES = ("auto", *PUSH_SCALES)
IDLE_POLL_SECONDS = 0.01  # a rank without samples polls the version counter this often
STALE_RETRIES = 3  # bounded staleness: recompute at most this often before pushing anyway
ASYNC_RULES = ("plain", "staleness", "dc")  # parallel.async_rule, formulas in the module doc
DC_LAMBDA = 0.04  # DC-ASGD's constant lambda (the paper's DC-ASGD-c setting)


def staleness_factor(rule, staleness):
    """How much of its update a push of this staleness applies: 1 / (1 + s) under "staleness"."""
    return 1.0 / (1 + staleness) if rule == "staleness" else 1.0


def compensate(grad, w_now, w_pulled, lam):
    """DC-ASGD's delay compensation, in place: grad += lam * grad * grad * (w_now - w_pulled),
    the first-order Taylor term of the gradient at w_now with the Hessian approximated by
    lam * g g^T's diagonal."""
    drift = w_now - w_pulled
    drift *= grad
    drift *= grad
    drift *= lam
    grad += drift
    return grad


def local_gradient(run, step, count):
    """Forward/backward on this rank's own `count` samples; returns the mean loss."""
    job, model, xp = run.job, run.model, run.xp
    model.params.zero_grad()
    loss_sum = 0.0
    micro = job.train.micro_batch or count
    starts_all = run.sampler.starts(step, job.train.batch_size, run.balancer.offsets[run.rank], count)
    for lo in range(0, count, micro):
        starts = starts_all[lo:lo + micro]
        x, y = get_batch(run.tokens.train, starts, job.model.block_size, xp)
        _, loss, cache = model.forward(x, y)
        model.backward(cache, loss_scale=len(starts) / count)
        loss_sum += float(loss) * len(starts)
    if job.optim.grad_clip > 0:
        model.ops.clip_grad_norm(model.params.grad, job.optim.grad_clip)
    return loss_sum / count


@disarms_watchdog
def train_async(run):
    job, comm, params = run.job, run.comm, run.model.params
    P, B, T = run.world, job.train.batch_size, job.model.block_size
    budget = job.train.max_iters * P
    rule = job.parallel.async_lr
    if rule == "auto":
        rule = "sqrt" if job.optim.name == "adamw" else "per_sample"
    push_scale = PUSH_SCALES[rule](P)
    update_rule, nbytes = job.parallel.async_rule, params.data.nbytes
    w_now = run.xp.empty_like(params.data) if update_rule == "dc" else None
    # device parameters and pushes go through the window's pinned host staging (llmpi.comm.rma)
    window = ShardedWindow(comm, params.data.size, np.dtype(params.data.dtype), server=job.parallel.server)
    version = VersionCounter(comm)
    stop_flag = VersionCounter(comm)
    start_version = int(run.resume_state.attrs.get("version", 0)) if run.resume_state else 0
    if run.is_root:
        window.put_all(params.data)
        if start_version:
            version.fetch_add(start_version)
        _forget_after(run.run_dir, start_version // P)
    comm.Barrier()  # the windows hold the initial parameters before anyone pulls

    count = run.balancer.counts[run.rank]
    periodic = _Periodic(run, budget, start_version, window)
    non_finite = None  # (version pulled, local step, loss) of this rank's first non-finite loss
    # (ticket, wall, loss, lr, staleness, comm seconds, samples, bytes pulled and pushed) of this rank's
    # applied pushes
    rows = []
    evals = []  # rank 0's (version, wall, val loss), logged once the samples behind each version are known
    progress = Progress(job.train.max_iters, start_version // P, run.bytes_per_token)
    t_origin = time.perf_counter() - run.wall_offset
    # A resumed run continues each rank's batch stream where the budget stood, not from the start.
    local_step, next_eval = start_version // P, _next_multiple(start_version, job.train.eval_interval * P)
    while True:
        if count == 0:  # no share of the batch (B < P, or balanced away): nothing to push
            if version.read() >= budget or stop_flag.read() or run.stop.requested:
                break
            time.sleep(IDLE_POLL_SECONDS)
            continue
        t_p = time.perf_counter()
        window.get(params.data)
        v_pull = version.read()
        pull_s = time.perf_counter() - t_p  # the pull is communication too, counted with the push
        pulls = 1
        if v_pull >= budget or stop_flag.read() or run.stop.requested:
            break
        run.check_fault(local_step)
        t0 = time.perf_counter()
        # Each rank draws its own stream of batches: (seed, rank, local step).
        loss = local_gradient(run, local_step * P + run.rank, count)
        for _ in range(STALE_RETRIES if job.parallel.max_staleness >= 0 else 0):
            if version.read() - v_pull <= job.parallel.max_staleness:
                break
            t_p = time.perf_counter()
            window.get(params.data)
            v_pull = version.read()
            pull_s += time.perf_counter() - t_p
            pulls += 1
            loss = local_gradient(run, local_step * P + run.rank, count)
        if not np.isfinite(loss):  # never pushed: the windows keep the last good parameters
            non_finite = (v_pull, local_step, loss)
            stop_flag.fetch_add(1)
            break
        if run.slowdown > 1.0:
            time.sleep((run.slowdown - 1.0) * (time.perf_counter() - t0))
        if w_now is not None:  # dc: where the others have moved the vector since the pull
            t_p = time.perf_counter()
            window.get(w_now)
            pull_s += time.perf_counter() - t_p
            pulls += 1
            compensate(params.grad, w_now, params.data, job.parallel.dc_lambda)
        lr = schedule_lr(job, v_pull // P) * push_scale
        delta = run.optimizer.delta(lr)
        t_c = time.perf_counter()
        ticket = version.fetch_add(1)
        if ticket >= budget:
            break
        if update_rule == "staleness":
            factor = staleness_factor(update_rule, ticket - v_pull)
            delta *= factor
            lr *= factor
        window.accumulate(delta)
        comm_s = pull_s + time.perf_counter() - t_c
        wall = time.perf_counter() - t_origin
        rows.append((ticket, wall, loss, lr, ticket - v_pull, comm_s, count, (pulls + 1) * nbytes))
        local_step += 1
        periodic.after_push(ticket, rows)
        progress.add(count * T * P, comm_s)
        if run.is_root and local_step % job.train.log_interval == 0:
            rprint(progress.line((ticket + 1) // P - 1, loss, lr, f"version {ticket + 1}/{budget} "
                                      f"staleness {ticket - v_pull}"))
        if run.is_root and job.train.eval_interval and ticket >= next_eval:
            # Rank 0 evaluates its freshly pulled copy; no other rank waits for this.
            next_eval = _next_multiple(ticket + 1, job.train.eval_interval * P)
            evals.append((ticket + 1, wall, _evaluate(run, ticket + 1)))
    if run.stop.requested:
        stop_flag.fetch_add(1)
    comm.Barrier()  # every push has completed at its target once all ranks are here
    error = _non_finite_error(run, comm.allgather(non_finite), P)
    if error:
        for w in (window, version, stop_flag):
            w.free()
        raise error
    if run.is_root:
        checkpoint.remove_incomplete(run.run_dir)  # parts of a boundary some rank left the loop before
    window.get(params.data)
    final_version = min(version.read(), budget)
    stopped_early = final_version < budget
    wall = time.perf_counter() - t_origin
    val = run.evaluate(final_version)
    rprint(f"eval: version {final_version} | {loss_text('val loss', val, run.bytes_per_token)}")
    evals.append((final_version, wall, val))
    samples = _log_metrics(run, rows, evals, _resumed_samples(run, start_version, B, P))
    run.save(final_version // P, extra_per_rank={"optim": _host_state(run.optimizer)},
             attrs={"version": final_version, "samples": samples})
    for w in (window, version, stop_flag):
        w.free()
    if stopped_early:
        rprint(f"stop requested by signal: checkpointed at version {final_version}, exiting")
    return 0


def _forget_after(run_dir, step):
    """Checkpoint files past the step this run starts from (a crashed run's, some of them without a
    manifest, or a newer one that failed to verify): they must not join this run's checkpoints."""
    for path in checkpoint.list_checkpoints(run_dir):
        if int(checkpoint.NAME_RE.search(path).group(1)) > step:
            checkpoint.remove(path)
    checkpoint.remove_incomplete(run_dir)


def _non_finite_error(run, reports, P):
    """After the loop, the same on every rank: the line naming the first non-finite loss, or None."""
    found = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not found:
        return None
    rank, (version, local_step, loss) = min(found, key=lambda item: item[1][0])
    kept = checkpoint.latest(run.run_dir)
    return UserError(f"the loss became {loss} on rank {rank} at version {version} (step {version // P}); "
                    "training stopped before that update" + (f", {kept} is the last checkpoint" if kept else "")
                    + "; lower optim.lr, raise schedule.warmup_iters or check the data")


class _Periodic:
    """The periodic checkpoints of one rank (module doc): its part at each boundary it passes."""

    def __init__(self, run, budget, start_version, window):
        self.run, self.budget, self.window = run, budget, window
        self.every = run.job.train.ckpt_interval * run.world
        self.done = start_version  # the newest boundary this rank has written its part of
        self.base = _resumed_samples(run, start_version, run.job.train.batch_size, run.world)
        self.reported = (start_version, None)  # (boundary, path) of rank 0's last "checkpoint:" line

    def after_push(self, ticket, rows):
        """This rank's part of every boundary its push passed (more than one when the others pushed
        past several while it computed: each checkpoint needs every rank's part)."""
        if not self.every:  # train.ckpt_interval = 0: the final checkpoint only
            return
        newest = (ticket + 1) // self.every * self.every
        for boundary in range(self.done + self.every, min(newest, self.budget - 1) + 1, self.every):
            self._part(ticket, rows, boundary)
        self.done = max(self.done, newest)
        latest = checkpoint.latest(self.run.run_dir) if self.run.is_root and newest > self.reported[0] else None
        if latest and latest != self.reported[1]:  # rank 0 tells of the newest, whoever wrote it
            self.reported = (newest, latest)
            rprint(f"checkpoint: {latest}")

    def _part(self, ticket, rows, boundary):
        run = self.run
        path = checkpoint.checkpoint_path(run.run_dir, boundary // run.world)
        if ticket + 1 == boundary:  # this push made the boundary version: snapshot the windows now
            params = run.model.params
            self.window.get(params.data)  # the next pull overwrites it anyway
            if not bool(run.xp.isfinite(params.data).all()):  # overflowed: never a checkpoint (it stays
                return  # incomplete, removed later); the next loss is non-finite and stops the run
            checkpoint.save_stage(checkpoint.stage_path(path, 0),
                                  {n: backend.to_host(params.views[n]) for n in params.names}, None,
                                  run.optimizer.t)
        mine = sum(row[6] for row in rows if row[0] < boundary)
        checkpoint.save_rank_part(checkpoint.rank_path(path, run.rank), run.rank,
                                  {"optim": _host_state(run.optimizer), "sampler": run.sampler.state_dict()},
                                  attrs={"samples": mine})
        self._complete(path, boundary)

    def _complete(self, path, boundary):
        """The manifest, by the one rank that finds every part in place and wins the claim."""
        run, P = self.run, self.run.world
        parts = [checkpoint.rank_path(path, r) for r in range(P)]
        stage = checkpoint.stage_path(path, 0)
        if not all(os.path.exists(p) for p in [stage, *parts]):
            return
        claimed = checkpoint.claim(path)
        if not claimed:
            return
        samples = self.base
        for part in parts:
            with h5py.File(part, "r") as f:
                samples += int(f.attrs["samples"])
        with open(os.path.join(run.run_dir, "config.toml")) as f:  # the resolved job, as Run wrote it
            config_toml = f.read()
        checkpoint.save_manifest_text(path, boundary // P, config_toml, [stage], balancer=run.balancer.state_dict(),
                                 attrs={"world_size": P, "mode": "async", "pipeline": 1, "data_world": P,
                                        "version": boundary, "samples": samples,
                                        "rank_files": [os.path.basename(p) for p in parts]})
        try:  # as Run.save: only a checkpoint that reads back whole lets older ones go
            checkpoint.check_files(path, [path, stage, *parts])
            run.verified = path
        except UserError as err:
            print(f"[rank {run.rank}] warning: the new checkpoint does not verify ({err}); keeping the older ones",
                  flush=True)
        checkpoint.prune(run.run_dir, protect=run.verified)
        os.remove(claimed)


def _next_multiple(v, k):
    return (v // k + 1) * k if k else float("inf")


def _host_state(optimizer):
    return {k: backend.to_host(v) for k, v in optimizer.state_dict().items()}


def _evaluate(run, version):
    val = run.val_loss(version)
    rprint(f"eval: version {version} | {loss_text('val loss', val, run.bytes_per_token)}")
    return val


def _resumed_samples(run, start_version, B, P):
    """Samples behind the checkpoint a run resumes from (estimated for checkpoints that predate the record)."""
    if not run.resume_state:
        return 0
    return int(run.resume_state.attrs.get("samples", start_version * B // P))


def _log_metrics(run, rows, evals, base_samples):
    """Every rank's pushes, ordered by ticket, into rank 0's metrics log, each with the exact
    number of samples behind it (ranks' shares differ when P does not divide B), then rank 0's
    evaluations at their versions. Returns the samples behind the final version (on every rank)."""
    everything = run.comm.gather(rows, root=0)
    total = None
    if run.is_root:
        merged = sorted(r for part in everything for r in part)
        samples_at = {}  # version -> samples behind it
        total = base_samples
        T = run.job.model.block_size
        for ticket, wall, loss, lr, stale, comm_s, count, comm_bytes in merged:
            total += count
            samples_at[ticket + 1] = total
            run.metrics.log_step(step=ticket + 1, wall=wall, loss=loss, lr=lr, tokens=count * T,
                                 samples=total, comm=comm_s, staleness=stale, comm_bytes=comm_bytes)
        for version, wall, val in evals:
            run.metrics.log_eval(step=version, wall=wall, samples=samples_at.get(version, total), val_loss=val)
    return run.comm.bcast(total, root=0)

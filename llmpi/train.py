"""`python -m llmpi.train [JOB] [--set section.key=value ...]`: train a GPT under MPI.

One command for one process or many: `mpiexec -n 4 python -m llmpi.train jobs/default.toml`.
Synchronous mode (this file): every step each rank computes the gradient of its share
of the global batch, the shares are summed with an all-reduce (each rank's gradient is
already scaled by its samples / B, so the sum is the sample-weighted average), and every
rank applies the identical optimizer step. Asynchronous mode lives in train_async.py.
"""
import argparse
import os
import signal
import sys
import time

from .launch import set_thread_defaults

set_thread_defaults()

import numpy as np  # noqa: E402  (thread counts must be set before NumPy loads BLAS)
from mpi4py import MPI  # noqa: E402

from . import backend, checkpoint, config as config_mod, data as data_mod  # noqa: E402
from .allocate import Balancer  # noqa: E402
from .comm import device as comm_device, util  # noqa: E402
from .comm.allreduce import Allreducer  # noqa: E402
from .errors import UserError  # noqa: E402
from .metrics import MetricsLog, Progress  # noqa: E402
from .model import GPT  # noqa: E402
from .optim import SGD, AdamW, clip_grad_norm, lr_at  # noqa: E402
from .threaded import ThreadedGrad  # noqa: E402

# Test hook: "RANK:STEP" raises on that rank at that step (the abort path); "RANK:STEP:USR1"
# sends that rank SIGUSR1 instead (the checkpoint-and-exit path, without timing races).
FAULT_ENV = "LLMPI_FAULT"


def parse_args(argv):
    p = util.ArgumentParser(
        prog="python -m llmpi.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT data-parallel under MPI (sync all-reduce or async RMA).",
        epilog="job keys (set in the job file or with --set section.key=value), with their built-in "
               "defaults, which the job file overrides:\n"
               + config_mod.describe())
    p.add_argument("job", nargs="?", default="default",
                   help="job file, or a name in jobs/ (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one job key; repeatable")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if the run directory already holds checkpoints")
    p.add_argument("--run-name", default=None, help="run directory name under train.out_dir "
                   "(default: train.run_name, else the job file's name)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "gpu"), help="overrides train.device")
    p.add_argument("--slowdown", default=None, metavar="RANK=FACTOR[,RANK=FACTOR]",
                   help="make ranks slower by sleeping (FACTOR-1) x their compute time")
    return p.parse_args(argv)


def resolve_job(args):
    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"train.run_name={args.run_name}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.slowdown is not None:
        overrides.append(f"parallel.slowdown={args.slowdown}")
    return config_mod.load_job(args.job, overrides)


def parse_slowdown(spec: str, world: int) -> dict:
    """'1=2.0,3=1.5' -> {1: 2.0, 3: 1.5}, checked against the world size."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            r, f = item.split("=")
            r, f = int(r), float(f)
        except ValueError:
            raise UserError(f"--slowdown item {item!r} must look like RANK=FACTOR, e.g. 1=2.0") from None
        if not 0 <= r < world or f < 1.0:
            raise UserError(f"--slowdown {item!r}: rank must be in 0..{world - 1} and FACTOR >= 1")
        out[r] = f
    return out


class StopFlag:
    """SIGTERM/SIGUSR1 (Slurm's warning before the time limit) and a first Ctrl-C ask for
    checkpoint-and-exit at the end of the step (the request travels in the step's collective,
    so every rank stops at the same step); a second Ctrl-C aborts the job (run_main)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if not self.requested:
                util.rprint("interrupt: checkpointing at the end of this step (Ctrl-C again aborts)")
        self.requested = True


class Run:
    """Everything a training loop needs, built identically on every rank."""

    def __init__(self, job, args, comm):
        self.job, self.comm = job, comm
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.xp = backend.select(job.train.device, util.local_rank())
        self.run_dir = os.path.join(job.train.out_dir, job.train.run_name)
        self.slowdown = parse_slowdown(job.parallel.slowdown, self.world).get(self.rank, 1.0)
        self.data_path = job.data.path or data_mod.default_data_path()
        self.tokens = data_mod.ensure_prepared(self.data_path, comm, block_size=job.model.block_size,
                                               vocab_size=job.model.vocab_size, progress=self.is_root)
        if job.model.vocab_size == 0:
            job.model.vocab_size = self.tokens.vocab_size
        self.resume_state = util.agree(lambda: self._find_resume(args), comm)
        try:
            self.model = GPT(job.model, xp=self.xp, seed=job.train.seed)
            self.optimizer = make_optimizer(job.optim, self.model.params)
        except MemoryError as err:  # every rank builds the same model, so all of them land here
            raise UserError(f"the model does not fit in memory ({err}); make model.n_layer / n_embd / "
                            "block_size smaller") from None
        self.threads = ThreadedGrad(self.model, job.train.threads) if job.train.threads > 1 else None
        self.sampler = data_mod.Sampler(len(self.tokens.train), job.model.block_size, job.train.seed,
                                        self.rank, self.world, job.data.sharding)
        self.val_sampler = data_mod.Sampler(len(self.tokens.val), job.model.block_size, job.train.seed,
                                            self.rank, self.world)
        self.balancer = Balancer(self.world, job.train.batch_size, [job.train.batch_size] * self.world,
                                 mode=job.parallel.balance, interval=job.parallel.balance_interval)
        self.metrics = MetricsLog(os.path.join(self.run_dir, "metrics.h5"), self.is_root)
        self.metrics.attrs.update(mode=job.parallel.mode, world_size=self.world)
        self.start_step, self.wall_offset = 0, 0.0
        self.stop = StopFlag()
        self.fault = self._fault()
        if self.resume_state is not None:
            self._restore(self.resume_state)
        util.agree(lambda: self._write_run_dir() if self.is_root else None, comm)

    def _write_run_dir(self):
        """Rank 0: the run directory with the resolved config.toml; on a fresh start (or
        --overwrite) without old checkpoints, so no stale one can win a later --resume."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            if self.resume_state is None:
                for old in checkpoint.list_checkpoints(self.run_dir):
                    os.remove(old)
            config_path = os.path.join(self.run_dir, "config.toml")
            with open(config_path + ".tmp", "w") as f:
                f.write(config_mod.to_toml(self.job))
            os.replace(config_path + ".tmp", config_path)
        except OSError as err:
            raise UserError(f"cannot write the run directory {self.run_dir} ({err.strerror}); "
                            "set train.out_dir to a writable directory") from None

    def _find_resume(self, args):
        path = checkpoint.latest(self.run_dir)
        if not args.resume:
            if path and not args.overwrite:
                raise UserError(f"run directory {self.run_dir} already holds checkpoints; pass --resume to "
                                "continue it, --overwrite to start afresh, or choose another --run-name")
            return None
        if path is None:
            raise UserError(f"--resume: no checkpoint in {self.run_dir}; check --run-name or drop --resume")
        state = checkpoint.load(path)
        checkpoint.check_model_matches(state["config"], self.job, path)
        # sync keeps one optimizer state and counts steps, async one per rank and counts pushes
        mode = str(state["attrs"].get("mode", self.job.parallel.mode))
        if mode != self.job.parallel.mode:
            raise UserError(f"checkpoint {path} was written in {mode} mode; resume it with "
                            f"parallel.mode={mode}, or start a new --run-name")
        ranks = int(state["attrs"].get("world_size", self.world))
        if mode == "async" and ranks != self.world:
            raise UserError(f"async checkpoint {path} was written by {ranks} ranks (its update count and "
                            f"per-rank optimizer states are per rank); resume it with {ranks} ranks")
        if state["step"] >= self.job.train.max_iters:
            raise UserError(f"run {self.run_dir} is already at step {state['step']} (train.max_iters = "
                            f"{self.job.train.max_iters}); raise train.max_iters to train further")
        state["path"] = path
        return state

    def _restore(self, st):
        # every rank reads the same file, so a mismatch raises the same UserError everywhere
        if st["params"].shape != self.model.params.data.shape:
            raise UserError(f"checkpoint {st['path']} holds {st['params'].size:,} parameters, the model has "
                            f"{self.model.params.data.size:,}: it is damaged; delete it to resume from an older one")
        self.model.params.data[...] = self.xp.asarray(st["params"])
        optim_state = st["optim"] or st["per_rank"].get("optim", {}).get(self.rank, {})
        if optim_state:
            try:
                self.optimizer.load_state_dict(optim_state)
            except (KeyError, ValueError) as err:
                raise UserError(f"checkpoint {st['path']} has optimizer state that does not fit "
                                f"optim.name = {self.job.optim.name!r} ({err}); resume with the optimizer "
                                "it was written with, or delete it") from None
        sampler_states = st["per_rank"].get("sampler", {})
        if self.rank in sampler_states and int(st["attrs"].get("world_size", self.world)) == self.world:
            self.sampler.load_state_dict(sampler_states[self.rank])
        elif self.job.data.sharding != "random":
            raise UserError(f"checkpoint {st['path']} was written by {st['attrs'].get('world_size')} ranks; "
                            f"the {self.job.data.sharding!r} sampler needs the same number to resume")
        if st["balancer"]:
            self.balancer.load_state_dict(st["balancer"])
        self.start_step = st["step"]
        # Async logs count versions (pushes), sync logs count steps.
        self.wall_offset = self.metrics.resume_from(int(st["attrs"].get("version", self.start_step)))

    def _fault(self):
        parts = os.environ.get(FAULT_ENV, "").split(":")
        if len(parts) >= 2 and int(parts[0]) == self.rank:
            return int(parts[1]), parts[2] if len(parts) > 2 else ""
        return None

    def check_fault(self, step):
        if self.fault is None or step != self.fault[0]:
            return
        if self.fault[1] == "USR1":
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise RuntimeError(f"{FAULT_ENV}: injected failure on rank {self.rank} at step {step}")

    def describe(self):
        j, m = self.job, self.model
        micro = j.train.micro_batch or -(-j.train.batch_size // self.world)
        act = m.activation_bytes_per_token() * micro * j.model.block_size
        state_bytes = m.params.data.nbytes * (4 if j.optim.name == "adamw" else 3)
        util.rprint(f"llmpi: {self.world} rank(s), mode {j.parallel.mode}, allreduce {j.parallel.allreduce}, "
                    f"device {backend.device_name}, BLAS threads/rank {backend.threads_hint()}")
        util.rprint(f"data: {self.data_path} ({self.tokens.tokenizer.name}, vocab {self.tokens.vocab_size}, "
                    f"{len(self.tokens.train):,} train / {len(self.tokens.val):,} val tokens, "
                    f"sharding {j.data.sharding})")
        util.rprint(f"model: {m.num_params():,} params, {j.model.n_layer} layers x {j.model.n_embd} ch, "
                    f"{m.precision()}; memory per rank ~ {state_bytes / 2**20:.1f} MiB params+grads+optimizer "
                    f"+ {act / 2**20:.1f} MiB activations ({m.activation_bytes_per_token() // j.model.n_layer:,} "
                    f"B/token/layer x {micro} x {j.model.block_size} tokens)")
        util.rprint(f"run: {self.run_dir}, {j.train.max_iters} steps of {j.train.batch_size} x "
                    f"{j.model.block_size} tokens")
        if self.resume_state is not None:
            util.rprint(f"resumed from {self.resume_state['path']} at step {self.start_step}")
        if backend.xp is not np and self.world > 1:
            util.rprint("gpu buffers: " + comm_device.describe(j.parallel.mode, j.parallel.allreduce,
                                                               j.parallel.cuda_aware_mpi))

    def val_loss(self, eval_index):
        """This rank's mean val loss over eval_iters batches (no communication)."""
        j = self.job
        n = max(1, j.train.micro_batch or -(-j.train.batch_size // self.world))
        total = 0.0
        for i in range(j.train.eval_iters):
            starts = self.val_sampler.val_starts(eval_index * j.train.eval_iters + i, n)
            x, y = data_mod.get_batch(self.tokens.val, starts, j.model.block_size, self.xp)
            total += self.model.loss(x, y)
        return total / j.train.eval_iters

    def evaluate(self, eval_index):
        """Mean val loss averaged over ranks (a collective)."""
        mean = np.array([self.val_loss(eval_index)])
        if self.world > 1:
            self.comm.Allreduce(MPI.IN_PLACE, mean)
            mean /= self.world
        return float(mean[0])

    def save(self, step, extra_per_rank=None, attrs=None):
        """Gather per-rank state to rank 0, which writes the checkpoint atomically."""
        per_rank = {"sampler": self.comm.gather(self.sampler.state_dict(), root=0)}
        for k, v in (extra_per_rank or {}).items():
            per_rank[k] = self.comm.gather(v, root=0)
        if self.is_root:
            path = checkpoint.checkpoint_path(self.run_dir, step)
            optim_state = None if extra_per_rank and "optim" in extra_per_rank else \
                {k: backend.to_host(v) for k, v in self.optimizer.state_dict().items()}
            checkpoint.save(path, backend.to_host(self.model.params.data), step, self.job,
                            optim_state=optim_state, per_rank=per_rank,
                            balancer=self.balancer.state_dict(),
                            attrs={"world_size": self.world, "mode": self.job.parallel.mode, **(attrs or {})})
            checkpoint.prune(self.run_dir)
            self.metrics.flush()
            util.rprint(f"checkpoint: {path}")


def make_optimizer(cfg, params):
    if cfg.name == "adamw":
        return AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


def schedule_lr(job, step):
    s = job.schedule
    return lr_at(step, job.optim.lr, s.warmup_iters, s.decay_iters or job.train.max_iters, s.min_lr)


def micro_chunks(count, micro):
    """Split a rank's `count` samples into micro-batches of at most `micro`."""
    micro = micro or count
    return [min(micro, count - i) for i in range(0, count, micro)] if count else []


def train_sync(run):
    job, comm, model, xp = run.job, run.comm, run.model, run.xp
    B, T = job.train.batch_size, job.model.block_size
    reducer = Allreducer(comm, job.parallel.allreduce, int(job.parallel.bucket_mb * 2**20), job.parallel.overlap,
                         cuda_aware_mpi=job.parallel.cuda_aware_mpi)
    progress = Progress(job.train.max_iters, run.start_step)
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
            x, y = data_mod.get_batch(run.tokens.train, starts, T, xp)
            if run.threads:
                loss = run.threads.forward_backward(x, y, loss_scale=m / B)
            else:
                _, loss, cache = model.forward(x, y)
                last = i == len(chunks) - 1
                hook = (lambda lo, hi: reducer.start(model.params.grad, lo, hi)) \
                    if (job.parallel.overlap and last) else None
                model.backward(cache, loss_scale=m / B, on_block_done=hook)
            loss_sum += float(loss) * m
            done += m
        if job.parallel.overlap and not chunks:
            for lo, hi in model.grad_spans():  # no samples here: the same buckets as the ranks' backward
                reducer.start(model.params.grad, lo, hi)
        compute = time.perf_counter() - t0 - (reducer.comm_seconds - comm_before)
        if run.slowdown > 1.0:
            time.sleep((run.slowdown - 1.0) * compute)
            compute *= run.slowdown
        if job.parallel.overlap:
            reducer.wait_all()
        else:
            reducer.reduce(model.params.grad)
        # One small collective carries the loss, this rank's speed and any stop request.
        t_c = time.perf_counter()
        row = np.array([loss_sum, compute / max(mine, 1), float(mine), float(run.stop.requested)])
        table = np.empty((run.world, 4))
        comm.Allgather(row, table)
        comm_s = reducer.comm_seconds - comm_before + time.perf_counter() - t_c
        loss = table[:, 0].sum() / B
        if job.optim.grad_clip > 0:
            clip_grad_norm(model.params.grad, job.optim.grad_clip)
        run.optimizer.step(lr)
        samples_seen += B
        wall = time.perf_counter() - t_origin
        run.metrics.log_step(step=step + 1, wall=wall, loss=loss, lr=lr, tokens=B * T,
                             samples=samples_seen, comm=comm_s, staleness=-1)
        progress.add(B * T, comm_s)
        run.balancer.observe([t if c > 0 else 0.0 for t, c in zip(table[:, 1], table[:, 2])])
        if run.balancer.maybe_rebalance(step + 1):
            util.rprint(f"balance: step {step + 1}: samples per rank {run.balancer.counts}")
        step += 1
        if step % job.train.log_interval == 0 or step == job.train.max_iters:
            util.rprint(progress.line(step - 1, loss, lr))
        if (job.train.eval_interval and step % job.train.eval_interval == 0) or step == job.train.max_iters:
            val = run.evaluate(step)
            run.metrics.log_eval(step=step, wall=wall, samples=samples_seen, val_loss=val)
            util.rprint(f"eval: step {step} | val loss {val:.4f}")
            run.metrics.flush()
        stopping = table[:, 3].any()
        if (job.train.ckpt_interval and step % job.train.ckpt_interval == 0) or step == job.train.max_iters \
                or stopping:
            run.save(step)
        if stopping:
            util.rprint(f"stop requested by signal: checkpointed at step {step}, exiting")
            return 0
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    comm = util.world()
    job = util.agree(lambda: resolve_job(args), comm)
    run = Run(job, args, comm)
    run.describe()
    if job.parallel.mode == "async":
        from .train_async import train_async
        return train_async(run)
    return train_sync(run)


if __name__ == "__main__":
    sys.exit(util.run_main(main, prog="llmpi.train") or 0)

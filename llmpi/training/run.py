"""A training run, built identically on every rank: the job's data, model, optimizer, samplers,
batch allocation and metrics; resume from a checkpoint; signals; injected faults; evaluation
and checkpointing. The loops (llmpi.training.sync, llmpi.training.async_rma) drive it.
"""
import atexit
import os
import re

import numpy as np
from mpi4py import MPI

from .. import backend, config as config_mod
from ..comm import device as comm_device
from ..comm.world import agree, local_rank, rprint
from ..data import Sampler, default_data_path, ensure_prepared, get_batch
from ..errors import UserError
from ..gpu.graph import graphs_for
from ..model.gpt import GPT, block_activation_bytes, head_activation_bytes, parameter_bytes, stage_layout

RECOMPUTED = {"gelu": ", GELU recomputed", "gelu+ln": ", GELU and LayerNorm outputs recomputed"}  # the startup line
from ..ops import select_cpu_kernels
from ..parallel.allocate import Balancer
from ..parallel.tensor import replicated
from ..parallel.zero import ShardedOptimizer
from ..parallel.threaded import ThreadedGrad
from . import checkpoint
from .lock import RunLock
from .memory import check_memory
from .signals import Fault, StopFlag, Watchdog, parse_slowdown
from .metrics import MetricsLog, loss_text
from .optim import make_optimizer

class Run:
    """Everything a training loop needs, built identically on every rank. This one holds the whole
    model on every rank (data parallel); llmpi.training.pipeline.PipelineRun one stage of it."""

    stage, stages = 0, 1  # the pipeline stage this rank holds, of how many
    tensor = None  # this rank's tensor group (llmpi.parallel.tensor.TensorGroup), None: whole layers

    def __init__(self, job, args, comm):
        self.job, self.comm = job, comm
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.data_rank, self.data_world = self.rank, self.world  # this rank's place among the replicas
        self.blocks = None  # the whole model
        self.xp = backend.select(job.train.device, local_rank(comm))
        select_cpu_kernels(job.train.cpu_kernels, job.model.dtype, comm, self.xp)  # before any model is built
        self.capture = graphs_for(self.xp) if job.train.cuda_graph else None  # train.device auto may be the CPU
        # a diverging run ends at check_finite with one line, not with NumPy's overflow warnings per rank
        np.seterr(over="ignore", invalid="ignore", divide="ignore")
        self.run_dir = os.path.join(job.train.out_dir, job.train.run_name)
        self.lock = RunLock(self.run_dir)
        self.verified = None  # the newest checkpoint known to read back whole (never pruned)
        agree(lambda: self._take_lock() if self.is_root else None, comm)
        self.slowdown = parse_slowdown(job.parallel.slowdown, self.world).get(self.rank, 1.0)
        self.data_path = job.data.path or default_data_path()
        self.tokens = ensure_prepared(self.data_path, comm, block_size=job.model.block_size,
                                      vocab_size=job.model.vocab_size, progress=self.is_root)
        if job.model.vocab_size == 0:
            job.model.vocab_size = self.tokens.vocab_size
        self.bytes_per_token = self.tokens.bytes_per_token  # for losses in bits per byte
        self._layout()
        self.resume_state = agree(lambda: self._find_resume(args), comm)
        agree(lambda: check_memory(self), comm)
        try:
            self.model = GPT(job.model, xp=self.xp, seed=job.train.seed, blocks=self.blocks, tensor=self.tensor)
            self.optimizer = self._make_optimizer()
        except MemoryError as err:  # every rank builds the same model, so all of them land here
            raise UserError(f"the model does not fit in memory ({err}); make model.n_layer / n_embd / "
                            "block_size smaller") from None
        self.threads = ThreadedGrad(self.model, job.train.threads) if job.train.threads > 1 else None
        self.sampler = Sampler(len(self.tokens.train), job.model.block_size, job.train.seed,
                               self.data_rank, self.data_world, job.data.sharding)
        self.val_sampler = Sampler(len(self.tokens.val), job.model.block_size, job.train.seed,
                                   self.data_rank, self.data_world)
        self.balancer = Balancer(self.data_world, job.train.batch_size, [job.train.batch_size] * self.data_world,
                                 mode=job.parallel.balance, interval=job.parallel.balance_interval)
        self.metrics = MetricsLog(os.path.join(self.run_dir, "metrics.h5"), self.is_root)
        self.metrics.attrs.update(mode=job.parallel.mode, world_size=self.world,
                                  bytes_per_token=self.bytes_per_token or 0.0)
        self.start_step, self.wall_offset = 0, 0.0
        self.stop = StopFlag()
        self.fault = Fault(self.rank)
        self.check_fault = self.fault.check
        self.watchdog = Watchdog(self.rank, job.train.watchdog_s)
        if self.resume_state is not None:
            self._restore(self.resume_state)
        agree(lambda: self._write_run_dir() if self.is_root else None, comm)

    def _layout(self):
        """Where this rank sits among the replicas and which blocks it holds (all of them here)."""

    def _make_optimizer(self):
        """The job's optimizer over this rank's buffer; with parallel.zero = 1 over its slice of the
        buffer only (llmpi.parallel.zero), sharded over the ranks that hold the same buffer."""
        job, model = self.job, self.model
        if not job.parallel.zero:
            return make_optimizer(job.optim, model.params, model.ops)
        return ShardedOptimizer(model.params, lambda part: make_optimizer(job.optim, part, model.ops),
                                self.data_comm(), job.parallel.allreduce)

    def data_comm(self):
        """The ranks that hold the same buffer as this one (all of them in data parallelism)."""
        return self.comm

    def state_bytes(self):
        return self._state_bytes(parameter_bytes(self.job.model, *(self.blocks or (0, None))))

    def _state_bytes(self, param_bytes):
        """Parameters, gradients and optimizer state (AdamW: m and v; SGD: a buffer) of a buffer of
        param_bytes; ZeRO-1 keeps 1/D of the optimizer state."""
        optimizer = 2 if self.job.optim.name == "adamw" else 1
        share = self.data_world if self.job.parallel.zero else 1
        return param_bytes * (2 + optimizer / share)

    def activation_bytes(self):
        """What backward keeps of one forward of this rank's share (or micro-batch)."""
        j = self.job
        micro = j.train.micro_batch or -(-j.train.batch_size // self.world)
        per_token = block_activation_bytes(j.model) * j.model.n_layer + head_activation_bytes(j.model)
        return per_token * micro * j.model.block_size

    def _take_lock(self):
        """Rank 0: hold the run directory's lock for the run's life (llmpi.training.lock); released at
        any exit that runs Python's exit handlers, found stale after a kill."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            self.lock.acquire()
        except OSError as err:
            raise UserError(f"cannot write the run directory {self.run_dir} ({err.strerror}); "
                            "set train.out_dir to a writable directory") from None
        atexit.register(self.lock.release)
        if self.lock.note:
            rprint(f"lock: {self.lock.note}")
        self.clean_stale_temporaries()

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
        # rank 0 reads every candidate through, newest first; all ranks take its choice
        path, skipped, error = self.comm.bcast(self._newest_verified() if self.is_root else None, root=0)
        for note in skipped:
            rprint(f"resume: skipped {note}")
        if error:
            raise UserError(error)
        self.verified = path
        state = checkpoint.load(path)
        checkpoint.check_model_matches(state.config, self.job, path)
        # sync keeps one optimizer state and counts steps, async one per rank and counts pushes
        mode = str(state.attrs.get("mode", self.job.parallel.mode))
        if mode != self.job.parallel.mode:
            raise UserError(f"checkpoint {path} was written in {mode} mode; resume it with "
                            f"parallel.mode={mode}, or start a new --run-name")
        ranks = int(state.attrs.get("world_size", self.world))
        if mode == "async" and ranks != self.world:
            raise UserError(f"async checkpoint {path} was written by {ranks} ranks (its update count and "
                            f"per-rank optimizer states are per rank); resume it with {ranks} ranks")
        if state.step >= self.job.train.max_iters:
            raise UserError(f"run {self.run_dir} is already at step {state.step} (train.max_iters = "
                            f"{self.job.train.max_iters}); raise train.max_iters to train further")
        return state

    def _newest_verified(self):
        """(path, [why each newer one was skipped], None), or (None, notes, the error line)."""
        skipped = []
        for path in reversed(checkpoint.list_checkpoints(self.run_dir)):
            try:
                checkpoint.verify(path)
                return path, skipped, None
            except UserError as err:
                skipped.append(f"{os.path.basename(path)}: {err}")
        return None, skipped, (f"--resume: no checkpoint in {self.run_dir} verifies ({'; '.join(skipped)}); "
                               "start afresh with --overwrite")

    def _restore(self, ck):
        """This rank's parameters and optimizer state by name, from a checkpoint of any layout
        (every rank reads the same files, so a mismatch raises the same UserError everywhere)."""
        params = self.model.params
        names = params.names
        for name, value in ck.each("params", names):  # one whole tensor at a time, then this rank's shard
            value = self._own_part(name, value)
            if value.shape != params.views[name].shape:
                raise UserError(f"checkpoint {ck.path} holds {name} of shape {value.shape}, the model "
                                f"{params.views[name].shape}: it is damaged; delete it to resume from an older one")
            params.views[name][...] = self.xp.asarray(value)
        keys = ck.optim_keys()
        if keys:
            optim_state = {key: self._flat(ck.each(key, names)) for key in keys}
            optim_state["step"] = ck.optim_step
        else:  # async: each worker's own optimizer state, in the whole model's flat layout
            optim_state = ck.per_rank.get("optim", {}).get(self.rank, {})
        if optim_state:
            try:
                self.optimizer.load_state_dict(optim_state)
            except (KeyError, ValueError) as err:
                raise UserError(f"checkpoint {ck.path} has optimizer state that does not fit "
                                f"optim.name = {self.job.optim.name!r} ({err}); resume with the optimizer "
                                "it was written with, or delete it") from None
        sampler_states = ck.per_rank.get("sampler", {})
        replicas = int(ck.attrs.get("data_world", ck.attrs.get("world_size", self.data_world)))
        if self.data_rank in sampler_states and replicas == self.data_world:
            self.sampler.load_state_dict(sampler_states[self.data_rank])
        elif self.job.data.sharding != "random":
            raise UserError(f"checkpoint {ck.path} was written by {replicas} data replicas; the "
                            f"{self.job.data.sharding!r} sampler needs the same number to resume")
        if ck.balancer:
            self.balancer.load_state_dict(ck.balancer)
        self.start_step = ck.step
        # Async logs count versions (pushes), sync logs count steps.
        self.wall_offset = self.metrics.resume_from(int(ck.attrs.get("version", self.start_step)))

    def _flat(self, by_name):
        """One flat host buffer in this rank's layout from (name, whole array) pairs."""
        params = self.model.params
        flat = np.empty(params.size, dtype=params.dtype)
        views = params.views_of(flat)
        for name, value in by_name:
            views[name][...] = self._own_part(name, value)
        return flat

    def _own_part(self, name, value):
        """This rank's part of a whole parameter read from a checkpoint: its tensor shard."""
        return self.tensor.shard(name, value) if self.tensor else value

    def describe(self):
        j, m = self.job, self.model
        micro = j.train.micro_batch or -(-j.train.batch_size // self.world)
        act, state_bytes = self.activation_bytes(), self.state_bytes()
        rprint(f"llmpi: {self.world} rank(s), mode {j.parallel.mode}, allreduce {j.parallel.allreduce}, "
               f"device {backend.device_name}, BLAS threads/rank {backend.threads_hint()}")
        rprint(f"data: {self.data_path} ({self.tokens.tokenizer.name}, vocab {self.tokens.vocab_size}, "
               f"{len(self.tokens.train):,} train / {len(self.tokens.val):,} val tokens, "
               f"sharding {j.data.sharding})")
        total = parameter_bytes(j.model) // m.params.dtype.itemsize
        rprint(f"model: {total:,} params, {j.model.n_layer} layers x {j.model.n_embd} ch, "
               f"{m.precision()}; memory on rank 0 ~ {state_bytes / 2**20:.1f} MiB params+grads+optimizer"
               f"{f' (optimizer state 1/{self.data_world}: ZeRO-1)' if j.parallel.zero else ''} "
               f"+ {act / 2**20:.1f} MiB activations ({block_activation_bytes(j.model, self._shards()):,} "
               f"B/token/layer x {micro} x {j.model.block_size} tokens"
               f"{RECOMPUTED.get(j.model.recompute, '')})")
        rprint(f"run: {self.run_dir}, {j.train.max_iters} steps of {j.train.batch_size} x "
               f"{j.model.block_size} tokens")
        if self.resume_state is not None:
            rprint(f"resumed from {self.resume_state.path} at step {self.start_step}")
        buffers = comm_device.describe_buffers(m.params.data, j.parallel.mode, j.parallel.allreduce,
                                               j.parallel.cuda_aware_mpi)
        if buffers and self.world > 1:
            rprint(f"gpu buffers: {buffers}")

    def check_finite(self, loss, step):
        """Stop the run (every rank alike: the loss came through the step's collective) before a
        NaN or inf loss reaches the weights; the checkpoints written so far stay."""
        if not np.isfinite(loss):
            kept = checkpoint.latest(self.run_dir)
            raise UserError(f"the loss became {loss} at step {step}; training stopped before the update"
                            + (f", {kept} is the last checkpoint" if kept else "")
                            + "; lower optim.lr, raise schedule.warmup_iters or check the data")

    def clean_stale_temporaries(self):
        """Rank 0, holding the lock: remove the temporary files (NAME.tmp[.PID]) that checkpoint, log
        and timeline writers of earlier jobs left when they were killed mid-write; no writer of this
        run directory is alive now (the lock), on any host, and nothing else would delete them."""
        for name in os.listdir(self.run_dir):
            if re.search(r"\.tmp(\.\d+)?$", name):
                os.remove(os.path.join(self.run_dir, name))
                rprint(f"removed {os.path.join(self.run_dir, name)}, left by a writer that was killed")

    def end_step(self, step, wall, samples, progress_line, stopping):
        """After optimizer step `step` (1-based): the progress line (`progress_line()`, which
        closes the progress window) every log_interval steps, the
        evaluation every eval_interval, the checkpoint every ckpt_interval, and at the end or on a
        stop request (returns True: the loop ends). Collective."""
        t = self.job.train
        if step % t.log_interval == 0 or step == t.max_iters:
            rprint(progress_line())
        if (t.eval_interval and step % t.eval_interval == 0) or step == t.max_iters:
            val = self.evaluate(step)
            self.metrics.log_eval(step=step, wall=wall, samples=samples, val_loss=val)
            rprint(f"eval: step {step} | {loss_text('val loss', val, self.bytes_per_token)}")
            self.metrics.flush()
        if (t.ckpt_interval and step % t.ckpt_interval == 0) or step == t.max_iters or stopping:
            self.save(step)
        if stopping:
            rprint(f"stop requested by signal: checkpointed at step {step}, exiting")
        self.watchdog.step_done()  # after the evaluation and the checkpoint, which take time too
        return bool(stopping)

    def val_loss(self, eval_index):
        """This rank's mean val loss over eval_iters batches (no communication)."""
        j = self.job
        n = max(1, j.train.micro_batch or -(-j.train.batch_size // self.world))
        total = 0.0
        for i in range(j.train.eval_iters):
            starts = self.val_sampler.val_starts(eval_index * j.train.eval_iters + i, n)
            x, y = get_batch(self.tokens.val, starts, j.model.block_size, self.xp)
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
        """Write a checkpoint: each stage's file from its rank of replica 0, then rank 0's manifest
        with every replica's sampler state (collective; atomic, see llmpi.training.checkpoint)."""
        path = checkpoint.checkpoint_path(self.run_dir, step)
        samplers = self.comm.gather(self.sampler.state_dict(), root=0)
        per_rank = {"sampler": samplers and [samplers[r] for r in self._replica_ranks()]}
        for k, v in (extra_per_rank or {}).items():
            per_rank[k] = self.comm.gather(v, root=0)
        with_optimizer = "optim" not in (extra_per_rank or {})
        optim_state = self.optimizer.state_dict() if with_optimizer else None  # ZeRO: gathered, collective
        if self.data_rank == 0:
            self._save_stage(self._stage_files(path)[self.stage * self._shards() + self._shard()], optim_state)
        self.comm.Barrier()  # every stage file is in place before the manifest names it
        if self.is_root:
            stages = self._stage_files(path)
            checkpoint.save_manifest(path, step, self.job, stages, per_rank=per_rank,
                                     balancer=self.balancer.state_dict(),
                                     attrs={"world_size": self.world, "mode": self.job.parallel.mode,
                                            "pipeline": self.stages, "data_world": self.data_world, **(attrs or {})})
            try:  # read back: only a checkpoint that verifies may let older ones go
                checkpoint.verify(path)
                self.verified = path
            except UserError as err:
                rprint(f"warning: the new checkpoint does not verify ({err}); keeping the older ones")
            checkpoint.prune(self.run_dir, protect=self.verified)
            self.metrics.flush()
            rprint(f"checkpoint: {path}")

    def _shards(self):
        return self.tensor.K if self.tensor else 1

    def _shard(self):
        return self.tensor.k if self.tensor else 0

    def _stage_files(self, path):
        """Every stage's file (every shard's, with tensor parallelism), in stage then shard order."""
        if self._shards() == 1:
            return [checkpoint.stage_path(path, s) for s in range(self.stages)]
        return [checkpoint.stage_path(path, s, k) for s in range(self.stages) for k in range(self._shards())]

    def _replica_ranks(self):
        """The world rank whose sampler state stands for each data replica, in replica order."""
        return list(range(self.world))

    def _saved_names(self):
        return self.model.params.names

    def _save_stage(self, path, state):
        """This rank's file of the checkpoint; state: the optimizer's, of this rank's whole buffer."""
        params = self.model.params
        names = self._saved_names()
        optim = None
        if state is not None:
            optim = {key: {n: backend.to_host(v) for n, v in params.views_of(flat).items() if n in names}
                     for key, flat in state.items() if key != "step"}
        tensor = None
        if self.tensor:  # the shards' whole shapes, which a reader of another K needs
            whole = dict(stage_layout(self.job.model, *(self.blocks or (0, self.job.model.n_layer))))
            tensor = (self.tensor.k, self.tensor.K, {n: whole[n] for n in names if not replicated(n)})
        checkpoint.save_stage(path, {n: backend.to_host(params.views[n]) for n in names}, optim,
                              self.optimizer.t, tensor)

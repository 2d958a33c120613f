"""Job configuration: dataclasses (one comment per field), TOML job files, --set overrides.

A job file has sections [model] [data] [optim] [schedule] [train] [parallel]; each maps
onto one dataclass below. Unknown sections or keys and invalid values raise UserError
naming the key and what is allowed. No config file is ever executed.
"""
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field, fields

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from . import backend, ops as op_tables, training
from .comm import allreduce, device, rma
from .data import sampler
from .errors import UserError
from .model import gpt, stages
from .parallel import allocate, grid_plan, pipeline
from .training import async_rma, graphed, optim

JOBS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")
PACKAGED_JOBS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jobs")


@dataclass
class ModelConfig:
    vocab_size: int = 0        # 0: take it from the data file
    block_size: int = 64       # context length T
    n_layer: int = 2           # transformer blocks
    n_head: int = 4            # attention heads; must divide n_embd
    n_embd: int = 64           # channels C
    dtype: str = "float32"     # float64 for gradient checks; bf16: GPU compute, float32 master weights
    recompute: str = "none"    # "gelu" (+ "ln"): backward recomputes GELU (and LayerNorm) outputs: less memory


@dataclass
class DataConfig:
    path: str = ""             # prepared .h5 file; "" = the built-in stdlib corpus (prepared on first use)
    sharding: str = "random"   # which windows each rank reads (data/README.md)


@dataclass
class OptimConfig:
    name: str = "adamw"        # the optimizer (llmpi.training.optim)
    lr: float = 1e-3           # peak learning rate
    beta1: float = 0.9         # AdamW first-moment decay
    beta2: float = 0.99        # AdamW second-moment decay
    eps: float = 1e-8          # AdamW denominator guard
    weight_decay: float = 0.1  # decoupled; only on 2-D weights (embeddings included, as GPT-2/nanoGPT)
    momentum: float = 0.9      # SGD momentum
    nesterov: bool = False     # SGD Nesterov momentum
    grad_clip: float = 1.0     # global grad-norm clip; 0 disables


@dataclass
class ScheduleConfig:
    warmup_iters: int = 20     # linear warmup steps
    decay_iters: int = 0       # cosine decay ends here; 0 = train.max_iters
    min_lr: float = 1e-4       # floor of the cosine decay


@dataclass
class TrainConfig:
    batch_size: int = 8        # global batch B in sequences, summed over ranks and micro-batches
    micro_batch: int = 0       # sequences per forward/backward on a rank; 0 = the whole per-rank share
    max_iters: int = 200       # optimizer steps (sync) / update budget (async)
    log_interval: int = 10     # print a progress line every N steps
    eval_interval: int = 100   # val loss every M steps (and at the end); 0 = only at the end
    eval_iters: int = 10       # val batches per evaluation
    ckpt_interval: int = 0     # checkpoint every K steps (always at the end); 0 = only at the end
    seed: int = 1337           # model init and sampling
    out_dir: str = "runs"      # run directories live here
    run_name: str = ""         # "" = the job file's name
    device: str = "cpu"        # auto: the GPU when CuPy sees one
    threads: int = 1           # CPU compute threads per rank, each on a slice of the batch (llmpi.parallel.threaded)
    cpu_kernels: str = "auto"  # CPU ops: fused Numba kernels (llmpi.cpu), the NumPy layers, or auto (fused with numba)
    watchdog_s: float = 600.0  # abort the job when no step completes for this long after the first; 0 disables
    cuda_graph: bool = False   # GPU, bf16: replay each micro-batch's forward+backward and the update as CUDA graphs


@dataclass
class ParallelConfig:
    mode: str = "sync"         # sync: all-reduce each step; async: one-sided RMA windows; local: average every H steps
    allreduce: str = "mpi"     # the gradient all-reduce (llmpi.comm.allreduce)
    bucket_mb: float = 0.0     # all-reduce in buckets of this many MiB; 0 = one call on the flat buffer
    overlap: bool = False      # start bucket reductions during backward (non-blocking)
    cuda_aware_mpi: str = "auto"  # GPU buffers straight to MPI: auto (ask the library), or pinned host staging (no)
    balance: str = "none"      # batch shares by measured speed (llmpi.parallel.allocate)
    balance_interval: int = 20 # dynamic: re-allocate every K steps
    server: str = "sharded"    # async: windows sharded over all ranks, or a rank0 parameter server
    max_staleness: int = -1    # async: re-pull when the pull is more than s versions old; -1 = unbounded
    async_lr: str = "auto"     # async push: per_sample lr/P, sqrt lr/sqrt(P), full lr; auto: sqrt adamw, per_sample sgd
    async_rule: str = "plain"  # async: staleness divides a push by 1 + its staleness; dc: delay-compensated gradient
    dc_lambda: float = async_rma.DC_LAMBDA  # async_rule dc: lambda in g + lambda * g * g * (w_now - w_pulled)
    local_steps: int = 8       # local: optimizer steps H between two averages of the replicas
    outer_lr: float = 1.0      # local: outer step on the averaged delta (1 with outer_momentum 0: plain averaging)
    outer_momentum: float = 0.0  # local: the outer step's Nesterov momentum (DiLoCo: outer_lr 0.7, momentum 0.9)
    slowdown: str = ""         # straggler simulation "RANK=FACTOR[,RANK=FACTOR]"
    pipeline: int = 1          # pipeline stages S: the ranks form world/(S K) data replicas x S stages x K shards
    micro_batches: int = 0     # pipeline: micro-batches per replica's share; 0 = min(4 x stages, the share)
    schedule: str = "1f1b"     # pipeline: the order of micro-batches (llmpi.parallel.pipeline)
    partition: str = "uniform" # pipeline: blocks per stage, uniform | auto (the allocator) | "a,b,c"
    memory_limit_mb: str = ""  # memory per rank for the plan and the start check: one value or one per rank
    tensor: int = 1            # tensor-parallel ranks K per stage (Megatron layers; K divides model.n_head)
    zero: int = 0              # 1: ZeRO stage 1, the optimizer state sharded over each data group
    grid: str = "fixed"        # fixed: pipeline x tensor as set; auto: the planner chooses D x S x K, zero, partition


@dataclass
class Job:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# The allowed values of the keys that name a choice, each read from the module that implements it.
CHOICES = {
    "model.dtype": tuple(gpt.DTYPES),
    "model.recompute": tuple(stages.RECOMPUTE),
    "data.sharding": sampler.STRATEGIES,
    "optim.name": optim.OPTIMIZERS,
    "train.device": backend.DEVICES,
    "train.cpu_kernels": op_tables.CPU_KERNELS,
    "parallel.mode": tuple(training.LOOPS),
    "parallel.allreduce": tuple(allreduce.ALGORITHMS),
    "parallel.cuda_aware_mpi": device.SETTINGS,
    "parallel.balance": allocate.MODES,
    "parallel.server": rma.SERVERS,
    "parallel.async_lr": async_rma.PUSH_RULES,
    "parallel.async_rule": async_rma.ASYNC_RULES,
    "parallel.schedule": pipeline.SCHEDULES,
    "parallel.grid": grid_plan.GRIDS,
}


def _coerce(key, value, typ):
    """Convert a TOML or --set value to the field's type, or explain why not."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{key} must be true or false (got {value!r})")
    if typ is int:
        if isinstance(value, bool):
            raise UserError(f"{key} must be an integer (got {value!r})")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise UserError(f"{key} must be an integer (got {value!r})") from None
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise UserError(f"{key} must be a number (got {value!r})") from None
    return str(value)


def _section(job, name):
    if not hasattr(job, name) or name.startswith("_"):
        allowed = ", ".join(f.name for f in fields(Job))
        raise UserError(f"unknown config section [{name}]; sections are: {allowed}")
    return getattr(job, name)


def set_value(job: Job, dotted: str, value):
    """Set `section.key` on a Job, with type coercion and a clear error."""
    if dotted.count(".") != 1:
        raise UserError(f"config key {dotted!r} must look like section.key, e.g. optim.lr")
    sec_name, key = dotted.split(".")
    sec = _section(job, sec_name)
    types = {f.name: f.type for f in fields(sec)}
    if key not in types:
        allowed = ", ".join(types)
        raise UserError(f"unknown config key {dotted!r}; keys in [{sec_name}] are: {allowed}")
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(types[key], types[key])
    setattr(sec, key, _coerce(dotted, value, typ))


def find_job_file(name: str) -> str:
    """A path as given, or a name looked up in jobs/ (repo checkout or installed package)."""
    candidates = [name]
    base = name if name.endswith(".toml") else name + ".toml"
    if os.path.dirname(base) == "jobs":  # `jobs/default.toml` typed outside the checkout
        base = os.path.basename(base)
    candidates += [os.path.join(JOBS_DIR, base), os.path.join(PACKAGED_JOBS_DIR, base)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise UserError(f"job file {name!r} not found (looked in the current directory and jobs/)")


def load_job(path: str = None, overrides=()) -> Job:
    """Defaults <- TOML file <- `section.key=value` overrides; then validate."""
    job = Job()
    if path:
        path = find_job_file(path)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"job file {path} is not valid TOML: {err}") from None
        for sec_name, table in doc.items():
            if not isinstance(table, dict):
                raise UserError(f"{path}: top-level key {sec_name!r} must be a [section]")
            _section(job, sec_name)
            for key, value in table.items():
                set_value(job, f"{sec_name}.{key}", value)
        if not job.train.run_name:
            job.train.run_name = os.path.splitext(os.path.basename(path))[0]
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        set_value(job, k.strip(), v.strip())
    if not job.train.run_name:
        job.train.run_name = "default"
    validate(job)
    return job


def validate(job: Job):
    for dotted, allowed in CHOICES.items():
        sec, key = dotted.split(".")
        v = getattr(getattr(job, sec), key)
        if v not in allowed:
            raise UserError(f"{dotted} = {v!r} is not allowed; choose one of: {', '.join(allowed)}")
    m, t = job.model, job.train
    positive = {"model.block_size": m.block_size, "model.n_layer": m.n_layer, "model.n_head": m.n_head,
                "model.n_embd": m.n_embd, "train.batch_size": t.batch_size, "train.max_iters": t.max_iters,
                "train.log_interval": t.log_interval, "train.eval_iters": t.eval_iters,
                "parallel.balance_interval": job.parallel.balance_interval, "train.threads": t.threads,
                "parallel.pipeline": job.parallel.pipeline, "parallel.tensor": job.parallel.tensor,
                "parallel.local_steps": job.parallel.local_steps,
                "parallel.outer_lr": job.parallel.outer_lr}
    for k, v in positive.items():
        if v <= 0:
            raise UserError(f"{k} must be positive (got {v})")
    nonneg = {"model.vocab_size": m.vocab_size, "train.micro_batch": t.micro_batch,
              "train.eval_interval": t.eval_interval, "train.ckpt_interval": t.ckpt_interval,
              "schedule.warmup_iters": job.schedule.warmup_iters, "schedule.decay_iters": job.schedule.decay_iters,
              "optim.lr": job.optim.lr, "optim.weight_decay": job.optim.weight_decay,
              "optim.grad_clip": job.optim.grad_clip, "parallel.bucket_mb": job.parallel.bucket_mb,
              "train.seed": t.seed, "parallel.micro_batches": job.parallel.micro_batches,
              "parallel.dc_lambda": job.parallel.dc_lambda, "train.watchdog_s": t.watchdog_s}
    for k, v in nonneg.items():
        if v < 0:
            raise UserError(f"{k} must be >= 0 (got {v})")
    o = job.optim
    for k, v in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2), ("optim.momentum", o.momentum),
                 ("parallel.outer_momentum", job.parallel.outer_momentum)):
        if not 0 <= v < 1:
            raise UserError(f"{k} must be in [0, 1) (got {v})")
    if o.eps <= 0:
        raise UserError(f"optim.eps must be positive (got {o.eps})")
    if not 0 <= job.schedule.min_lr <= o.lr:
        raise UserError(f"schedule.min_lr must be between 0 and optim.lr = {o.lr} (got {job.schedule.min_lr}); "
                        "set both when lowering the learning rate")
    if job.parallel.mode == "async" and job.parallel.balance != "none":
        raise UserError("parallel.balance applies to sync mode (async ranks already push at their own "
                        "pace); set parallel.balance = 'none' with parallel.mode = 'async'")
    if job.parallel.mode == "local" and job.parallel.balance != "none":
        raise UserError("parallel.balance applies to sync mode (local-SGD shares stay fixed for the "
                        "average's weights); set parallel.balance = 'none' with parallel.mode = 'local'")
    if job.parallel.max_staleness < -1:
        raise UserError(f"parallel.max_staleness must be -1 (unbounded) or >= 0 (got {job.parallel.max_staleness})")
    if t.threads > 1 and (job.parallel.overlap or t.device != "cpu"):
        raise UserError("train.threads > 1 splits the batch over CPU threads: it needs train.device = 'cpu' "
                        "and parallel.overlap = false")
    _validate_pipeline(job)
    graphed.check_job(job)
    _validate_values(job)
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")


SEED_LIMIT = 2 ** 63  # seeds are hashed as unsigned 64-bit integers (llmpi.data.sampler)


def _validate_values(job):
    """Numbers that would train to NaN or end as a traceback, refused up front."""
    for sec in fields(job):
        table = getattr(job, sec.name)
        for f in fields(table):
            value = getattr(table, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{sec.name}.{f.name} must be a finite number (got {value})")
    if job.train.seed >= SEED_LIMIT:
        raise UserError(f"train.seed must be below 2**63 (got {job.train.seed})")
    if job.optim.nesterov and job.optim.momentum <= 0:
        raise UserError("optim.nesterov = true needs optim.momentum > 0")
    run_name = job.train.run_name
    if os.path.isabs(run_name) or os.path.normpath(run_name) in ("", ".") or \
            os.path.normpath(run_name).split(os.sep)[0] == "..":
        raise UserError(f"train.run_name {run_name!r} must name a directory inside train.out_dir "
                        "(no absolute path, no '..')")


def memory_limits_mb(text: str):
    """parallel.memory_limit_mb as a list of floats (one value or one per rank), [] for no limit."""
    try:
        limits = [float(v) for v in text.split(",")] if text.strip() else []
    except ValueError:
        raise UserError(f"parallel.memory_limit_mb must be one number or a comma list, one per rank "
                        f"(got {text!r})") from None
    if any(v <= 0 for v in limits):
        raise UserError(f"parallel.memory_limit_mb values must be positive (got {text!r})")
    return limits


def _validate_pipeline(job):
    p, t = job.parallel, job.train
    memory_limits_mb(p.memory_limit_mb)
    if p.zero not in (0, 1):
        raise UserError(f"parallel.zero must be 0 (replicated optimizer state) or 1 (ZeRO stage 1) (got {p.zero})")
    if p.zero and (p.mode != "sync" or p.overlap):
        raise UserError("parallel.zero = 1 shards the optimizer state of synchronous steps: it needs "
                        "parallel.mode = 'sync' and parallel.overlap = false")
    if job.model.n_head % p.tensor:
        raise UserError(f"parallel.tensor = {p.tensor} must divide model.n_head = {job.model.n_head} "
                        "(each tensor rank holds whole heads)")
    if p.pipeline == 1 and p.tensor == 1:
        return
    axis = "parallel.pipeline > 1" if p.pipeline > 1 else "parallel.tensor > 1"
    if t.micro_batch:
        raise UserError(f"with {axis} the micro-batches are parallel.micro_batches (a count); "
                        "leave train.micro_batch at 0")
    refused = [(p.mode != "sync", "parallel.mode = 'sync'"), (p.balance != "none", "parallel.balance = 'none'"),
               (p.overlap, "parallel.overlap = false"), (t.threads > 1, "train.threads = 1")]
    for bad, needed in refused:
        if bad:
            raise UserError(f"{axis} needs {needed} (model parallelism with batch shares, async pushes, "
                            "overlapped buckets and compute threads is not combined yet)")


def to_dict(job: Job) -> dict:
    return dataclasses.asdict(job)


def to_toml(job: Job) -> str:
    """The resolved job as TOML (saved in every run directory and checkpoint), written by a TOML
    library so that any string (a quote in a run name, a backslash in a path) reads back as it was."""
    return tomli_w.dumps(to_dict(job))


def from_toml_text(text: str) -> Job:
    job = Job()
    for sec, table in tomllib.loads(text).items():
        for k, v in table.items():
            set_value(job, f"{sec}.{k}", v)
    return job


def describe() -> str:
    """Every job key with its default and the comment beside it (for --help)."""
    import inspect
    import re
    comments = {}
    for cls in (ModelConfig, DataConfig, OptimConfig, ScheduleConfig, TrainConfig, ParallelConfig):
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+):.*?#\s*(.*)$", line)
            if m:
                comments[(cls.__name__, m.group(1))] = m.group(2)
    out = []
    for sec in fields(Job):
        cls = type(getattr(Job(), sec.name))
        for f in fields(cls):
            default = getattr(cls(), f.name)
            key = f"{sec.name}.{f.name}"
            text = comments.get((cls.__name__, f.name), "")
            if key in CHOICES:
                text = f"one of: {' | '.join(CHOICES[key])}" + (f"; {text}" if text else "")
            out.append(f"  {key} = {default!r}\n      {text}")
    return "\n".join(out)

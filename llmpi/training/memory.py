"""The start-up memory check: llmpi's own accounting of a rank's buffers (Run.state_bytes,
Run.activation_bytes) against parallel.memory_limit_mb and against the memory its node shares
among its ranks, so a job that cannot fit is refused before it allocates anything."""
from mpi4py import MPI

from .. import backend, config as config_mod
from ..errors import UserError


def check_memory(run):
    """parallel.memory_limit_mb, and the memory the arrays live in shared by its ranks, against
    llmpi's own accounting of this rank's buffers (collective)."""
    need = run.state_bytes() + run.activation_bytes()
    recompute = ", model.recompute = 'gelu' or 'gelu+ln'" if run.job.model.recompute == "none" else ""
    node = run.comm.Split_type(MPI.COMM_TYPE_SHARED, key=run.rank)
    ranks_here = node.Get_size()
    node.Free()
    share = backend.memory_per_rank(ranks_here)
    if share and need > share:
        raise UserError(f"rank {run.rank} needs ~{need / 2**30:.1f} GiB (parameters, gradients, optimizer state, "
                        f"activations) but this node's {ranks_here} rank(s) have {share / 2**30:.1f} GiB each "
                        f"on {backend.device_name}; use a smaller train.batch_size or train.micro_batch{recompute}, "
                        "a smaller model, or more stages")
    limits = config_mod.memory_limits_mb(run.job.parallel.memory_limit_mb)
    if not limits:
        return
    if len(limits) not in (1, run.world):
        raise UserError(f"parallel.memory_limit_mb has {len(limits)} values for {run.world} ranks; give one "
                        "value or one per rank")
    limit = limits[0] if len(limits) == 1 else limits[run.rank]
    if need > limit * 2**20:
        raise UserError(f"rank {run.rank} needs {need / 2**20:.1f} MiB ({run.state_bytes() / 2**20:.1f} "
                        f"params+grads+optimizer + {run.activation_bytes() / 2**20:.1f} activations) but "
                        f"parallel.memory_limit_mb gives it {limit:g}; use more pipeline stages "
                        f"(parallel.pipeline) or tensor shards (parallel.tensor), parallel.zero = 1{recompute}, "
                        "fewer micro-batch samples or a smaller model")

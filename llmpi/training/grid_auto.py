"""parallel.grid = "auto" at start: profile every rank once, let the grid planner
(llmpi.parallel.grid_plan) choose D x S x K, ZeRO-1 and the partition, and write the choice into
the job's parallel keys before the run is built (llmpi.train picks the run that fits them)."""
from .. import backend, config as config_mod
from ..comm.world import agree, local_rank, rprint
from ..data import default_data_path, ensure_prepared
from ..parallel import grid_plan
from ..parallel.profile import profile
from .optim import make_optimizer
from .signals import parse_slowdown

RUNNERS_UP = 4  # printed beside the choice


def profile_for_grids(job, comm, repeats=3):
    """(Profile, b0, memory limit per rank or None): every rank measured once at b0 = the batch /
    the world sequences per micro-batch; collective. Sets model.vocab_size from the data if 0."""
    world = comm.Get_size()
    if job.model.vocab_size == 0:
        tokens = ensure_prepared(job.data.path or default_data_path(), comm, block_size=job.model.block_size,
                                 progress=comm.Get_rank() == 0)
        job.model.vocab_size = tokens.vocab_size
    limits = agree(lambda: [v * 2**20 for v in config_mod.memory_limits_mb(job.parallel.memory_limit_mb)], comm)
    limit = (limits * world if len(limits) == 1 else limits) or None
    slowdown = agree(lambda: parse_slowdown(job.parallel.slowdown, world), comm).get(comm.Get_rank(), 1.0)
    b0 = max(1, job.train.batch_size // world)
    xp = backend.select(job.train.device, local_rank(comm))
    prof = profile(comm, job.model, b0, 1, lambda params, ops: make_optimizer(job.optim, params, ops), xp,
                   repeats, slowdown, job.train.seed)
    return prof, b0, limit


def candidate_line(c):
    if not c.fits:
        return f"{c.label}: cannot run ({c.reason or 'does not fit memory'})"
    return f"{c.label}: {1e3 * c.step_time:.1f} ms"


def choose_grid(job, comm):
    """Choose and apply the grid (collective); rank 0 prints it, its prediction and the runners-up."""
    world = comm.Get_size()
    prof, b0, limit = profile_for_grids(job, comm)
    ranked = agree(lambda: grid_plan.rank(prof, job, b0, limit, config_mod.validate), comm)
    best = agree(lambda: grid_plan.choose(ranked, world), comm)
    p = job.parallel
    p.pipeline, p.tensor, p.zero = best.S, best.K, best.zero
    # K = 1 leaves the stages to the pipeline's own planner, which also places the ranks
    p.partition = "uniform" if best.S == 1 else "auto" if best.K == 1 else best.partition_text()
    others = "; ".join(candidate_line(c) for c in ranked[1:1 + RUNNERS_UP])
    rprint(f"grid (auto): {best.label} (D x S x K) of {len(ranked)} candidates, partition {best.partition_text()}, "
           f"{best.micro_batches} micro-batch(es); predicted step {1e3 * best.step_time:.1f} ms; runners-up: "
           f"{others or 'none'}")
    return best

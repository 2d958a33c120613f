"""`python -m llmpi.plan [JOB] [--set ...] [--pipeline S] [--micro-batches m] [--schedule 1f1b|gpipe]
[--memory-limit-mb X[,X...]] [--partition auto|uniform|a,b,c] [--grid auto] [--json]`: plan a job's
pipeline stages, or with --grid auto its whole grid.

Under mpiexec every rank profiles itself for the job's model (llmpi.parallel.profile), and rank 0
prints the per-rank costs and the memory per block, the plan (blocks per stage, which rank runs
each stage), its predicted step time, bubble and memory per stage, beside the uniform plan
(llmpi.parallel.partition states the model both are predicted by). The pipeline flags set the
job's parallel.* keys, as --set would. `--grid auto` (or parallel.grid = "auto") instead ranks
every D x S x K grid with ZeRO-1 on and off (llmpi.parallel.grid_plan): the choice that
parallel.grid = "auto" trains with, its prediction and every other candidate's, or why it cannot run.

`python -m llmpi.plan --assign costs.csv --loads 1,2,3 --capacities 4,4 [--objective total|max]`
solves one instance of the general allocation problem (llmpi.parallel.assign; costs.csv: N rows of
M comma-separated numbers, inf where a task may not run on a unit) exactly and by the greedy and
annealing heuristics, and prints the assignment, the optimum and each heuristic's gap.

--json prints one JSON object as the last line.
"""
import argparse
import dataclasses
import json
import math
import sys

from .cli import set_thread_defaults

set_thread_defaults()

from . import backend, config as config_mod  # noqa: E402  (thread counts must be set before NumPy loads BLAS)
from .cli import ArgumentParser, run_main  # noqa: E402
from .comm.world import agree, local_rank, rprint, world  # noqa: E402
from .errors import UserError  # noqa: E402
from .parallel import assign as assign_mod, partition  # noqa: E402
from .parallel.grid import check_shape  # noqa: E402
from .parallel.pipeline import SCHEDULES, micro_batch_count  # noqa: E402

MiB = float(1 << 20)


def parse_args(argv):
    p = ArgumentParser(prog="python -m llmpi.plan", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Plan a job's pipeline stages from measured costs, or solve one "
                                   "assignment instance (--assign).")
    p.add_argument("job", nargs="?", default=None, help="job file, or a name in jobs/ (default: default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one job key; repeatable")
    p.add_argument("--pipeline", type=int, default=None, metavar="S", help="sets parallel.pipeline "
                   "(default: the job's, or the world size when the job has 1)")
    p.add_argument("--micro-batches", type=int, default=None, metavar="M",
                   help="sets parallel.micro_batches (S > 1; one stage uses train.micro_batch, as training does)")
    p.add_argument("--schedule", default=None, choices=SCHEDULES, help="sets parallel.schedule")
    p.add_argument("--memory-limit-mb", default=None, metavar="X[,X...]", help="sets parallel.memory_limit_mb")
    p.add_argument("--partition", default="auto", metavar="auto|uniform|a,b,c",
                   help="the plan shown beside the uniform one (default: %(default)s)")
    p.add_argument("--grid", default=None, choices=("auto",), help="rank every D x S x K grid instead of "
                   "planning the job's pipeline")
    p.add_argument("--slowdown", default=None, metavar="RANK=FACTOR[,RANK=FACTOR]",
                   help="multiply those ranks' measured compute times by FACTOR")
    p.add_argument("--device", default=None, choices=backend.DEVICES, help="overrides train.device")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, median (default: 3)")
    p.add_argument("--assign", default=None, metavar="COSTS.CSV", help="solve a general assignment instance")
    p.add_argument("--loads", default=None, metavar="W1,W2,...", help="--assign: one load per task (row)")
    p.add_argument("--capacities", default=None, metavar="L1,L2,...", help="--assign: one capacity per unit (column)")
    p.add_argument("--objective", default="total", choices=assign_mod.OBJECTIVES, help="--assign: minimise the "
                   "total cost or the largest per-unit cost (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="--assign: the annealing seed (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    return p.parse_args(argv)


def numbers(text, what):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{what} must be numbers separated by commas (got {text!r})") from None


def read_costs(path):
    """costs.csv -> N rows of M floats (blank lines and # comments skipped), or a UserError line."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--assign {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            rows.append(numbers(line, f"--assign {path} line {n}"))
    if not rows:
        raise UserError(f"--assign {path}: no rows of costs (expected N rows of M numbers)")
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        raise UserError(f"--assign {path}: rows have {' or '.join(map(str, widths))} numbers; every row "
                        "needs one per unit")
    return rows


def solve_instance(args):
    if args.job or args.overrides:
        raise UserError("--assign solves a general instance and takes no JOB or --set")
    if args.loads is None or args.capacities is None:
        raise UserError("--assign needs --loads (one per task) and --capacities (one per unit)")
    costs = read_costs(args.assign)
    loads, caps = numbers(args.loads, "--loads"), numbers(args.capacities, "--capacities")
    return costs, loads, caps, assign_mod.compare(costs, loads, caps, args.objective, args.seed)


def gap_text(gap):
    return "no feasible assignment found" if math.isinf(gap) else f"gap {100 * gap:.2f}%"


def report_assign(args, costs, loads, caps, result):
    best = result["optimum"]
    lines = [f"assign: {len(loads)} tasks on {len(caps)} units, objective {args.objective} (costs: {args.assign})",
             " task   load  unit     cost"]
    lines += [f"{i:5d} {loads[i]:6g} {j:5d} {costs[i][j]:8g}" for i, j in enumerate(best.units)]
    lines.append(" unit   load  capacity     cost")
    lines += [f"{j:5d} {best.unit_load[j]:6g} {caps[j]:9g} {best.unit_cost[j]:8g}" for j in range(len(caps))]
    lines.append(f"optimum (exact, scipy.optimize.milp): {best.cost:g}")
    for name in ("greedy", "anneal"):
        found = result[name]
        lines.append(f"{name}: {found.cost:g} ({gap_text(result['gap'][name])})" if found else
                     f"{name}: {gap_text(math.inf)}")
    rprint("\n".join(lines))
    if args.json:
        rprint(json.dumps({"mode": "assign", "objective": args.objective, "optimum": best.to_dict(),
                           **{k: result[k] and result[k].to_dict() for k in ("greedy", "anneal")},
                           "gap": {k: None if math.isinf(g) else g for k, g in result["gap"].items()}}))


def resolve_job(args, world_size, grid=False):
    overrides = list(args.overrides)
    for key, value in (("pipeline", args.pipeline), ("micro_batches", args.micro_batches),
                       ("schedule", args.schedule), ("memory_limit_mb", args.memory_limit_mb),
                       ("slowdown", args.slowdown)):
        if value is not None:
            overrides.append(f"parallel.{key}={value}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1 (got {args.repeats})")
    job = config_mod.load_job(args.job or "default", overrides)
    if not grid and args.pipeline is None and job.parallel.pipeline == 1:
        job.parallel.pipeline = world_size  # planning one stage would show nothing to plan
        config_mod.validate(job)
    return job


def settings(job, spec, world_size, rank):
    """(S, D, m, sequences per micro-batch, memory limit bytes per rank or None, this rank's
    slowdown), the way the runtime (llmpi.training.pipeline, llmpi.training.run) chooses them;
    `spec` (--partition) checked before any measuring."""
    from .training.signals import parse_slowdown
    p, B = job.parallel, job.train.batch_size
    S = p.pipeline
    D = check_shape(world_size, S, job.model.n_layer)
    if spec not in partition.PARTITIONS:
        partition.parse_partition(spec, job.model.n_layer, S)
    share, smallest = -(-B // D), B // D  # the largest and smallest replica share (even split)
    if S == 1:  # the whole model per rank: train.micro_batch is a size
        micro = min(job.train.micro_batch or share, share)
        m = -(-share // micro)
    else:
        m = micro_batch_count(p.micro_batches, smallest, S, B)
        micro = -(-share // m)
    limits = config_mod.memory_limits_mb(p.memory_limit_mb)
    if len(limits) not in (0, 1, world_size):
        raise UserError(f"parallel.memory_limit_mb has {len(limits)} values for {world_size} ranks; give one "
                        "value or one per rank")
    limit = [v * MiB for v in limits] * (world_size if len(limits) == 1 else 1) or None
    return S, D, m, micro, limit, parse_slowdown(p.slowdown, world_size).get(rank, 1.0)


def ms(seconds):
    return f"{1e3 * seconds:.3f}"


def mib(nbytes):
    return f"{nbytes / MiB:.2f}"


def plan_lines(title, plan):
    order = " | ".join(",".join(map(str, (row[s] for row in plan.slots))) for s in range(len(plan.blocks)))
    lines = [f"{title}: blocks per stage {','.join(map(str, plan.blocks))}, ranks per stage {order}; predicted "
             f"step {ms(plan.step_time)} ms (pipeline {ms(plan.compute_time)} + sync {ms(plan.sync_time)} + tied "
             f"wte {ms(plan.tied_time)}), bubble {100 * plan.bubble:.1f}% (equal stages: "
             f"{100 * plan.bubble_balanced:.1f}%)" + ("" if plan.exact else ", heuristic search (not proven optimal)"),
             " stage  blocks  ranks     time ms  memory MiB  limit MiB  fits"]
    first = 0
    for s, n in enumerate(plan.blocks):
        ranks = ",".join(str(row[s]) for row in plan.slots)
        limit = "-" if math.isinf(plan.capacity[s]) else mib(plan.capacity[s])
        lines.append(f"{s:6d}  {first:>2}-{first + n - 1:<3} {ranks:>6} {ms(plan.stage_time[s]):>11} "
                     f"{mib(plan.memory[s]):>11} {limit:>10}  {'yes' if plan.fits[s] else 'NO'}")
        first += n
    return lines


def report_plan(args, job, setting, prof, chosen, uniform):
    S, D, m, micro, limit, _ = setting
    cfg, z = job.model, prof.sizes
    lines = [f"llmpi.plan: {cfg.n_layer} blocks (n_embd {cfg.n_embd}, n_head {cfg.n_head}, block_size "
             f"{cfg.block_size}, vocab {cfg.vocab_size}, {cfg.dtype}) on {len(prof.ranks)} ranks = {D} replica(s) x "
             f"{S} stage(s); {m} micro-batches of {micro} sequences, schedule {job.parallel.schedule}",
             "per rank, seconds per micro-batch (slowdown applied):",
             " rank  slowdown  block ms  embedding ms  head ms  sync ns/KiB  send ms  limit MiB"]
    for r, p in enumerate(prof.ranks):
        cap = "-" if limit is None else mib(limit[r])
        lines.append(f"{r:5d} {p.slowdown:9.2f} {ms(p.block_time):>9} {ms(p.embedding_time):>13} "
                     f"{ms(p.head_time):>8} {1e9 * 1024 * (p.optimizer_rate + p.allreduce_rate):12.3f} "
                     f"{ms(p.send_time):>8} {cap:>10}")
    factor = prof.ranks[0].state_factor
    lines.append(f"memory: a block holds {mib(z.block_param_bytes)} MiB of parameters (x{factor:g} with gradients "
                 f"and optimizer state) and keeps {mib(z.block_activation_bytes)} MiB of activations per micro-batch; "
                 f"embedding {mib(z.embedding_param_bytes)} MiB, head {mib(z.head_param_bytes)} MiB + "
                 f"{mib(z.head_activation_bytes)} MiB of activations per micro-batch, tied wte copy "
                 f"{mib(z.tied_param_bytes)} MiB on the last stage when S > 1")
    lines += plan_lines(f"{chosen.method} plan", chosen) + plan_lines("uniform plan", uniform)
    cut = 1.0 - chosen.step_time / uniform.step_time if uniform.step_time else 0.0
    lines.append(f"{chosen.method} vs uniform: predicted step {ms(chosen.step_time)} ms vs "
                 f"{ms(uniform.step_time)} ms, a cut of {100 * cut:.1f}%")
    rprint("\n".join(lines))
    if args.json:
        rprint(json.dumps({"mode": "pipeline", "stages": S, "replicas": D, "micro_batches": m, "micro_batch": micro,
                           "schedule": job.parallel.schedule, "memory_limit": limit,
                           "ranks": [dataclasses.asdict(p) for p in prof.ranks], "sizes": dataclasses.asdict(z),
                           "plan": chosen.to_dict(), "uniform": uniform.to_dict(), "cut": cut}))


def report_grids(args, job, comm):
    from .parallel import grid_plan
    from .training.grid_auto import candidate_line, profile_for_grids
    prof, b0, limit = profile_for_grids(job, comm, args.repeats)
    ranked = agree(lambda: grid_plan.rank(prof, job, b0, limit, config_mod.validate), comm)
    best = agree(lambda: grid_plan.choose(ranked, comm.Get_size()), comm)
    lines = [f"llmpi.plan --grid auto: {job.model.n_layer} blocks (n_embd {job.model.n_embd}, n_head "
             f"{job.model.n_head}) on {comm.Get_size()} ranks, batch {job.train.batch_size}; {len(ranked)} "
             f"candidates D x S x K, predicted time per step (profiled at {b0} sequences per micro-batch):"]
    lines += [("* " if c is best else "  ") + candidate_line(c) + (f", partition {c.partition_text()}, ranks per "
              f"stage {c.stage_ranks()}, {c.micro_batches} micro-batch(es), memory per rank by stage "
              f"{', '.join(mib(m) for m in c.plan.memory)} MiB" if c.fits else "") for c in ranked]
    rprint("\n".join(lines))
    if args.json:
        rprint(json.dumps({"mode": "grid", "chosen": best.to_dict(), "candidates": [c.to_dict() for c in ranked]}))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    comm = world()
    if args.assign is not None:
        report_assign(args, *agree(lambda: solve_instance(args), comm))
        return 0
    if args.grid or "parallel.grid=auto" in args.overrides:
        report_grids(args, agree(lambda: resolve_job(args, comm.Get_size(), grid=True), comm), comm)
        return 0
    from .data import default_data_path, ensure_prepared
    from .parallel.profile import profile
    from .training.optim import make_optimizer
    job = agree(lambda: resolve_job(args, comm.Get_size()), comm)
    setting = agree(lambda: settings(job, args.partition, comm.Get_size(), comm.Get_rank()), comm)
    S, D, m, micro, limit, slowdown = setting
    if job.model.vocab_size == 0:  # take it from the data, as training does
        tokens = ensure_prepared(job.data.path or default_data_path(), comm, block_size=job.model.block_size,
                                 progress=comm.Get_rank() == 0)
        job.model.vocab_size = tokens.vocab_size
    xp = backend.select(job.train.device, local_rank())
    prof = profile(comm, job.model, micro, S, lambda params, ops: make_optimizer(job.optim, params, ops), xp,
                   args.repeats, slowdown, job.train.seed)
    costs = prof.costs()
    chosen = agree(lambda: partition.plan(costs, S, m, job.parallel.schedule, limit, args.partition), comm)
    uniform = partition.plan(costs, S, m, job.parallel.schedule, limit, "uniform")
    report_plan(args, job, setting, prof, chosen, uniform)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="llmpi.plan") or 0)

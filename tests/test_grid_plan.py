"""The grid planner (llmpi.parallel.grid_plan) against exhaustive search on small worlds: for every
D x S x K grid, ZeRO-1 on and off, every partition of the blocks and (K = 1) every placement of
the ranks, the predicted step of partition.evaluate on the same modelled costs; the planner's
choice must be the least of all that fit memory, and each candidate's plan the least of its grid."""
import itertools
import math

import pytest

from llmpi import config
from llmpi.errors import UserError
from llmpi.parallel import grid_plan, partition
from llmpi.parallel.profile import Profile, RankProfile, model_sizes

MiB = 2.0**20


def job_and_profile(world, speeds, n_layer=4, batch=8, allreduce_rate=2e-9):
    job = config.load_job(None, [f"model.n_layer={n_layer}", "model.n_head=4", "model.n_embd=32",
                                 "model.block_size=16", "model.vocab_size=50", f"train.batch_size={batch}"])
    b0 = max(1, batch // world)
    ranks = [RankProfile(block_time=1e-3 * s, embedding_time=2e-4 * s, head_time=6e-4 * s, optimizer_rate=1e-9,
                         allreduce_rate=allreduce_rate if world > 1 else 0.0, send_time=5e-5, slowdown=1.0,
                         state_factor=4.0) for s in speeds]
    return job, Profile(ranks, model_sizes(job.model, b0), n_layer), b0


def compositions(L, S):
    for cuts in itertools.combinations(range(1, L), S - 1):
        edges = (0, *cuts, L)
        yield [b - a for a, b in zip(edges[:-1], edges[1:])]


def brute_force(prof, job, b0, c, limit):
    """The least predicted step of candidate c's grid over every partition and placement."""
    costs = grid_plan.grid_costs(prof, job.model, b0, c.D, c.S, c.K, c.zero, c.micro_batch)
    units = c.D * c.S
    unit_limit = None if limit is None else [min(limit[g * c.K:(g + 1) * c.K]) for g in range(units)]
    orders = itertools.permutations(range(units)) if c.K == 1 else [range(units)]
    best = math.inf
    for order in orders:
        slots = [[order[d * c.S + s] for s in range(c.S)] for d in range(c.D)]
        for blocks in compositions(job.model.n_layer, c.S):
            p = partition.evaluate(costs, blocks, slots, c.micro_batches, job.parallel.schedule, unit_limit)
            if all(p.fits):
                best = min(best, p.step_time)
    return best


CASES = [  # world, speeds (relative block times), memory limit MiB per rank or None
    (2, [1.0, 1.0], None), (2, [1.0, 3.0], None), (3, [1.0, 1.0, 2.0], None), (4, [1.0, 1.0, 1.0, 1.0], None),
    (4, [1.0, 2.0, 1.0, 4.0], None), (4, [1.0, 1.0, 1.0, 1.0], 0.45), (4, [1.0, 1.5, 1.0, 1.0], 0.32),
]


@pytest.mark.parametrize("world,speeds,limit_mb", CASES)
def test_the_choice_is_the_exhaustive_optimum(world, speeds, limit_mb):
    job, prof, b0 = job_and_profile(world, speeds)
    limit = None if limit_mb is None else [limit_mb * MiB] * world
    ranked = grid_plan.rank(prof, job, b0, limit, config.validate)
    assert {(c.D, c.S, c.K) for c in ranked} == set(grid_plan.shapes(world, 4, 4))
    truth = {}
    for c in ranked:
        if c.reason and "does not fit" not in c.reason:
            continue  # refused by the trainer's own rules (none here: every grid can run this job)
        truth[c.label] = brute_force(prof, job, b0, c, limit)
        assert c.step_time == pytest.approx(truth[c.label], rel=1e-12) or math.isinf(truth[c.label]) == (not c.fits)
    best = grid_plan.choose(ranked, world)
    assert best.step_time == pytest.approx(min(truth.values()), rel=1e-12)
    assert all(best.plan.fits)


def test_memory_limits_push_the_choice_to_model_parallel_grids():
    """On a fast network and without a limit 4 data replicas win (no bubble, next to no
    communication); at a limit one whole model per rank cannot meet, a sharded grid is chosen."""
    job, prof, b0 = job_and_profile(4, [1.0] * 4, allreduce_rate=1e-12)
    free = grid_plan.choose(grid_plan.rank(prof, job, b0), 4)
    assert (free.S, free.K) == (1, 1)
    whole = grid_plan.rank(prof, job, b0, [1e3 * MiB] * 4)
    need = max(next(c for c in whole if c.label == "4x1x1").plan.memory)
    tight = grid_plan.rank(prof, job, b0, [0.9 * need] * 4)
    best = grid_plan.choose(tight, 4)
    assert (best.S, best.K, best.zero) != (1, 1, 0) and max(best.plan.memory) <= 0.9 * need
    assert not next(c for c in tight if c.label == "4x1x1").fits


def test_a_slow_rank_gets_fewer_blocks_or_a_lighter_grid():
    job, prof, b0 = job_and_profile(2, [1.0, 3.0], allreduce_rate=1e-6)  # slow network: data parallel is costly
    best = grid_plan.choose(grid_plan.rank(prof, job, b0), 2)
    if best.S == 2:  # a pipeline: the slow rank runs the stage with fewer blocks
        slow_stage = [s for s, ranks in enumerate(best.stage_ranks()) if 1 in ranks][0]
        assert best.plan.blocks[slow_stage] < best.plan.blocks[1 - slow_stage]


def test_no_grid_fits_is_one_line_naming_the_fix():
    job, prof, b0 = job_and_profile(2, [1.0, 1.0])
    with pytest.raises(UserError, match="no grid of the 2 ranks can run this job.*parallel.memory_limit_mb"):
        grid_plan.choose(grid_plan.rank(prof, job, b0, [1e-3 * MiB] * 2), 2)


def test_grids_the_trainer_refuses_are_listed_with_the_reason():
    job, prof, b0 = job_and_profile(2, [1.0, 1.0])
    job.parallel.mode = "async"  # model parallel and ZeRO need synchronous steps
    ranked = grid_plan.rank(prof, job, b0, None, config.validate)
    best = grid_plan.choose(ranked, 2)
    assert (best.D, best.S, best.K, best.zero) == (2, 1, 1, 0)
    assert all("needs parallel.mode = 'sync'" in c.reason or "parallel.zero = 1" in c.reason
               for c in ranked if c is not best)

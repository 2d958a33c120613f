"""llmpi.parallel.partition: the planner against brute force over every partition and every
placement of the ranks on random small instances (costs, speeds, memory limits, orders, both
schedules, D = 1 and 2), the infeasible case, user and uniform partitions, a memory limit that
forces an uneven partition, and the 2-rank case with one rank 2x slower. The brute force scores
plans with its own reading of the model in the module docstring. Single-process (each rank of
an `mpiexec -n 4 pytest` run checks the same things independently)."""
import itertools
import math

import numpy as np
import pytest

import llmpi.parallel.partition as partition
from llmpi.errors import UserError
from llmpi.parallel.partition import PipelineCosts, evaluate, optimal, parse_partition, place, plan


def compositions(L, S):
    for cuts in itertools.combinations(range(1, L), S - 1):
        edges = (0, *cuts, L)
        yield [edges[i + 1] - edges[i] for i in range(S)]


def step_of(c, blocks, slots, m, schedule, caps):
    """The predicted step of the module docstring, summed directly; None if a stage overflows."""
    S, K = len(blocks), m + len(blocks) - 1
    edges = np.r_[0, np.cumsum(blocks)]
    slowest = sync = 0.0
    for s in range(S):
        b, e = edges[s], edges[s + 1]
        first, last = s == 0, s == S - 1
        params = sum(c.block_param_bytes[b:e]) + first * c.embedding_param_bytes + last * (
            c.head_param_bytes + (S > 1) * c.tied_param_bytes)
        kept = sum(c.block_activation_bytes[b:e]) + last * c.head_activation_bytes
        memory = c.state_factor * params + (m if schedule == "gpipe" else min(m, S - s)) * kept
        for row in slots:
            r = row[s]
            if memory > caps[r]:
                return None
            t = sum(c.block_time[r][b:e]) + first * c.embedding_time[r] + last * c.head_time[r]
            if not last:
                t += c.send_time if np.ndim(c.send_time) == 0 else c.send_time[r][row[s + 1]]
            slowest, sync = max(slowest, t), max(sync, c.sync_rate[r] * params)
    return K * slowest + sync + (c.tied_time if S > 1 else 0.0)


def brute_force(c, S, m, schedule, caps):
    """(best step, None if nothing fits) over all partitions x all placements of the ranks."""
    R, best = c.ranks, None
    for blocks in compositions(c.blocks, S):
        for perm in itertools.permutations(range(R)):
            slots = [perm[d * S:(d + 1) * S] for d in range(R // S)]
            step = step_of(c, blocks, slots, m, schedule, caps)
            if step is not None and (best is None or step < best):
                best = step
    return best


def random_costs(rng, R, L, matrix_send, identical=False):
    speed = rng.choice([1.0, 1.5, 2.0], R) if not identical else np.ones(R)
    return PipelineCosts(
        block_time=np.outer(speed, rng.integers(1, 4, L)), embedding_time=0.5 if identical else rng.random(R),
        head_time=1.0 if identical else 2 * rng.random(R), block_param_bytes=100 * rng.integers(1, 5, L),
        embedding_param_bytes=300, head_param_bytes=10, tied_param_bytes=200,
        block_activation_bytes=50 * rng.integers(1, 3, L), head_activation_bytes=70,
        send_time=rng.random((R, R)) if matrix_send else float(rng.random()),
        sync_rate=0.001 if identical else 0.01 * rng.random(R), tied_time=0.3)


def instances(seed, count):
    rng = np.random.default_rng(seed)
    for n in range(count):
        S = int(rng.integers(1, 4))
        D = 2 if S <= 2 and n % 3 == 0 else 1
        L = int(rng.integers(S, 6))
        c = random_costs(rng, D * S, L, matrix_send=D == 1 and n % 2 == 0, identical=n % 5 == 0)
        whole = c.state_factor * (c.block_param_bytes.sum() + 510) + 4 * (c.block_activation_bytes.sum() + 70)
        caps = whole * rng.choice([np.inf, 1.0, 0.6, 0.4], D * S)  # from roomy to too small for one stage
        yield c, S, int(rng.integers(1, 5)), str(rng.choice(["1f1b", "gpipe"])), caps


def test_optimal_against_brute_force_over_partitions_and_placements():
    solved = infeasible = 0
    for c, S, m, schedule, caps in instances(15, 150):
        best = brute_force(c, S, m, schedule, caps)
        if best is None:
            with pytest.raises(UserError, match="does not fit"):
                optimal(c, S, m, schedule, caps)
            infeasible += 1
            continue
        p = optimal(c, S, m, schedule, caps)
        assert p.exact and all(p.fits)
        assert math.isclose(p.step_time, best, rel_tol=1e-9), (p, best)
        assert math.isclose(step_of(c, p.blocks, p.slots, m, schedule, caps), p.step_time, rel_tol=1e-12)
        solved += 1
    assert solved > 100 and infeasible > 20


def test_heuristic_search_never_beats_the_optimum_and_places_exactly(monkeypatch):
    monkeypatch.setattr(partition, "EXACT_WORK", 0)  # as if the instance were too large to search
    checked = 0
    for c, S, m, schedule, caps in instances(4, 50):
        if np.ndim(c.send_time) == 2:
            continue
        best = brute_force(c, S, m, schedule, caps)
        if best is None:
            continue
        try:
            p = optimal(c, S, m, schedule, caps)
        except UserError:  # a heuristic may miss the one fitting plan; it must say so, not hang
            continue
        assert not p.exact and p.step_time >= best * (1 - 1e-12)
        # the placement half is exact: no other placement of the ranks is better for p's partition
        slots = place(c, p.blocks, m, schedule, caps)
        placed = step_of(c, p.blocks, slots, m, schedule, caps)
        every = [step_of(c, p.blocks, [perm[d * S:(d + 1) * S] for d in range(c.ranks // S)], m, schedule, caps)
                 for perm in itertools.permutations(range(c.ranks))]
        assert math.isclose(placed, min(v for v in every if v is not None), rel_tol=1e-9)
        checked += 1
    assert checked > 10


def two_ranks(slow=2.0, L=12):
    return PipelineCosts(block_time=[[1e-3] * L, [slow * 1e-3] * L], embedding_time=[2e-5, 2e-5 * slow],
                         head_time=[5e-5, 5e-5 * slow], block_param_bytes=1e5, embedding_param_bytes=2e5,
                         head_param_bytes=1e3, tied_param_bytes=1.5e5, block_activation_bytes=1e4,
                         send_time=2e-5, sync_rate=1e-11, tied_time=2e-5)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_one_rank_twice_as_slow_cuts_the_step_by_about_a_third(schedule):
    auto, uniform = plan(two_ranks(), 2, 8, schedule), plan(two_ranks(), 2, 8, schedule, partition="uniform")
    assert uniform.blocks == (6, 6) and uniform.order == (0, 1)
    fast = auto.order.index(0)
    assert auto.blocks[fast] == 8 and auto.blocks[1 - fast] == 4
    cut = 1 - auto.step_time / uniform.step_time
    assert cut == pytest.approx(1 / 3, abs=0.01)  # blocks alone: max(8 x 1, 4 x 2) against 6 x 2


def test_equal_ranks_get_the_uniform_partition_in_rank_order_and_the_textbook_bubble():
    c = PipelineCosts(block_time=np.ones((4, 8)), embedding_time=0.0, head_time=0.0, block_param_bytes=1.0)
    p = plan(c, 4, 6)
    assert p.blocks == (2, 2, 2, 2) and p.slots == ((0, 1, 2, 3),)
    assert p.bubble == pytest.approx(3 / 9) == p.bubble_balanced
    assert p.step_time == pytest.approx(9 * 2.0)


def test_a_memory_limit_forces_an_uneven_partition():
    # equal speeds, but stage 0 also holds a large embedding: 6 blocks of 1 unit fit only as 2 + 4
    c = PipelineCosts(block_time=np.ones((2, 6)), embedding_time=0.0, head_time=0.0, block_param_bytes=1.0,
                      embedding_param_bytes=3.0, state_factor=1.0)
    uniform = plan(c, 2, 4, memory_limit=5.0, partition="uniform")
    assert uniform.blocks == (3, 3) and uniform.fits == (False, True) and uniform.memory == (6.0, 3.0)
    auto = plan(c, 2, 4, memory_limit=5.0)
    assert auto.blocks == (2, 4) and all(auto.fits)
    assert plan(c, 2, 4).blocks == (3, 3)  # without the limit: even


def test_1f1b_keeps_fewer_activations_than_gpipe():
    c = PipelineCosts(block_time=np.ones((2, 4)), embedding_time=0.0, head_time=0.0, block_param_bytes=0.0,
                      block_activation_bytes=10.0)
    one_f, gpipe = plan(c, 2, 8, "1f1b", partition="uniform"), plan(c, 2, 8, "gpipe", partition="uniform")
    assert one_f.memory == (2 * 20.0, 1 * 20.0) and gpipe.memory == (8 * 20.0, 8 * 20.0)


def test_the_model_not_fitting_is_one_line_with_the_memory_needed_and_available():
    c = PipelineCosts(block_time=np.ones((2, 4)), embedding_time=0.0, head_time=0.0, block_param_bytes=2 ** 20)
    with pytest.raises(UserError, match=r"does not fit 1 pipeline stage.*needs 16\.0 MiB.*offers 10\.0 MiB"):
        plan(c, 1, 2, memory_limit=10 * 2 ** 20)
    two = plan(c, 2, 2, memory_limit=10 * 2 ** 20)  # two stages of 8 MiB fit
    assert two.blocks == (2, 2) and two.memory == (8 * 2 ** 20, 8 * 2 ** 20)


def test_uneven_user_partition_and_its_checks():
    c = PipelineCosts(block_time=np.ones((3, 5)), embedding_time=0.0, head_time=0.0, block_param_bytes=1.0)
    p = plan(c, 3, 4, partition="1,3,1")
    assert p.blocks == (1, 3, 1) and p.method == "user" and p.stage_time == (1.0, 3.0, 1.0)
    assert p.step_time == pytest.approx((4 + 2) * 3.0)
    assert p.bubble == pytest.approx(1 - 4 * 5.0 / (3 * 6 * 3.0))
    for spec, message in [("1,3", "2 entries for 3"), ("0,4,1", "at least one block"), ("1,3,2", "sums to 6"),
                          ("a,b,c", "blocks per stage like")]:
        with pytest.raises(UserError, match=message):
            parse_partition(spec, 5, 3)


def test_replicas_share_the_partition_and_slow_ranks_share_a_stage():
    # 4 ranks, 2 replicas x 2 stages, ranks 2 and 3 twice as slow: they belong on one stage
    c = PipelineCosts(block_time=np.outer([1, 1, 2, 2], np.ones(6)), embedding_time=0.0, head_time=0.0,
                      block_param_bytes=1.0)
    p = plan(c, 2, 4)
    assert {frozenset(row[s] for row in p.slots) for s in range(2)} == {frozenset({0, 1}), frozenset({2, 3})}
    assert sorted(p.blocks) == [2, 4] and p.stage_time == (4.0, 4.0)
    assert sorted(sum(map(list, p.slots), [])) == [0, 1, 2, 3]


def test_bad_settings_are_user_errors():
    c = PipelineCosts(block_time=np.ones((4, 3)), embedding_time=0.0, head_time=0.0, block_param_bytes=1.0)
    for kwargs, message in [(dict(S=3, micro_batches=2), "divide the 4 ranks"),
                            (dict(S=4, micro_batches=2), "between 1 and the 3 blocks"),
                            (dict(S=2, micro_batches=0), "micro-batches must be a positive"),
                            (dict(S=2, micro_batches=2, schedule="zb"), "schedule must be one of"),
                            (dict(S=2, micro_batches=2, memory_limit=[1, 2]), "one value or 4")]:
        with pytest.raises(UserError, match=message):
            plan(c, **kwargs)
    with pytest.raises(UserError, match="place each of the 4 ranks once"):
        evaluate(c, [2, 1], [[0, 1], [1, 2]], 2)
    with pytest.raises(UserError, match="per-pair send_time needs one replica"):
        plan(PipelineCosts(block_time=np.ones((4, 3)), embedding_time=0.0, head_time=0.0, block_param_bytes=1.0,
                           send_time=np.ones((4, 4))), 2, 2)
    with pytest.raises(UserError, match="embedding_time needs one number or 4"):
        PipelineCosts(block_time=np.ones((4, 3)), embedding_time=[1, 2], head_time=0.0, block_param_bytes=1.0)
    with pytest.raises(UserError, match="finite and >= 0"):
        PipelineCosts(block_time=-np.ones((4, 3)), embedding_time=0.0, head_time=0.0, block_param_bytes=1.0)

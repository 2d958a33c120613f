"""llmpi.parallel.assign: the exact solver against exhaustive search on random small instances
(both objectives, forbidden pairs, tight capacities), the infeasible cases, the heuristics'
gaps, and the known wrong dynamic program over the total load. Single-process (each rank of an
`mpiexec -n 4 pytest` run checks the same things independently)."""
import itertools

import numpy as np
import pytest

from llmpi.errors import UserError
from llmpi.parallel.assign import OBJECTIVES, anneal, assign, compare, gap, greedy, solve


def exhaustive(costs, loads, caps, objective):
    """The optimum over all M^N assignments, or None if none fits."""
    C, W, L = np.asarray(costs, float), np.asarray(loads, float), np.asarray(caps, float)
    N, M = C.shape
    best = None
    for units in itertools.product(range(M), repeat=N):
        per_task = C[np.arange(N), units]
        if np.isinf(per_task).any() or (np.bincount(units, weights=W, minlength=M) > L).any():
            continue
        unit_cost = np.bincount(units, weights=per_task, minlength=M)
        value = unit_cost.sum() if objective == "total" else unit_cost.max()
        best = value if best is None else min(best, value)
    return best


def random_instance(rng):
    N, M = int(rng.integers(1, 7)), int(rng.integers(1, 4))
    costs = rng.integers(0, 10, (N, M)).astype(float)
    costs[rng.random((N, M)) < 0.15] = np.inf  # some tasks may not run on some units
    return costs, rng.integers(0, 4, N).astype(float), rng.integers(0, 7, M).astype(float)


def is_feasible(result, costs, loads, caps):
    C = np.asarray(costs, float)
    units = np.array(result.units)
    on_unit = np.bincount(units, weights=np.asarray(loads, float), minlength=C.shape[1])
    return np.isfinite(C[np.arange(len(units)), units]).all() and (on_unit <= np.asarray(caps) + 1e-9).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_optimal_against_exhaustive_search(objective):
    rng = np.random.default_rng(15)
    solved = infeasible = 0
    for _ in range(60):
        costs, loads, caps = random_instance(rng)
        best = exhaustive(costs, loads, caps, objective)
        result = solve(costs, loads, caps, objective)
        if best is None:
            assert result is None
            with pytest.raises(UserError):
                assign(costs, loads, caps, objective)
            infeasible += 1
            continue
        assert result.cost == best
        assert is_feasible(result, costs, loads, caps)
        solved += 1
    assert solved > 20 and infeasible > 3


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_heuristics_are_feasible_and_their_gaps_are_not_negative(objective):
    rng = np.random.default_rng(7)
    for _ in range(25):
        costs, loads, caps = random_instance(rng)
        if solve(costs, loads, caps, objective) is None:
            continue
        result = compare(costs, loads, caps, objective, seed=3)
        for name in ("greedy", "anneal"):
            found = result[name]
            assert result["gap"][name] >= 0
            if found is None:
                assert result["gap"][name] == float("inf")
            else:
                assert is_feasible(found, costs, loads, caps)
                assert found.cost >= result["optimum"].cost
        again = anneal(costs, loads, caps, objective, seed=3)
        assert (again and again.units) == (result["anneal"] and result["anneal"].units)  # deterministic


def test_gap_definition():
    opt = assign([[1.0, 4.0], [2.0, 1.0]], [1, 1], [1, 1])
    assert opt.cost == 2.0
    worse = greedy([[1.0, 4.0], [2.0, 1.0]], [1, 1], [1, 1])
    assert gap(worse, opt) == (worse.cost - 2.0) / 2.0
    assert gap(None, opt) == float("inf")


def total_load_dp(costs, loads, capacities):
    """THE KNOWN WRONG SOLUTION, kept here as a counter-example: a knapsack-style dynamic program
    whose state is the total load placed so far (one running sum), bounded by the total capacity.
    It never looks at each unit's own load, so it can put more on one unit than that unit holds."""
    C, W = np.asarray(costs, float), [int(w) for w in loads]
    total = int(sum(capacities))
    best = {0: (0.0, [])}  # total load -> (cost, units)
    for i, w in enumerate(W):
        nxt = {}
        for placed, (cost, units) in best.items():
            for j in range(C.shape[1]):
                if placed + w <= total and (placed + w not in nxt or cost + C[i, j] < nxt[placed + w][0]):
                    nxt[placed + w] = (cost + C[i, j], units + [j])
        best = nxt
    return min(best.values())


def test_the_dp_over_the_total_load_overfills_a_unit_and_assign_does_not():
    costs = [[1.0, 5.0], [1.0, 5.0], [1.0, 5.0]]  # every task is cheapest on unit 0
    loads, caps = [2, 2, 2], [2, 4]  # 6 = 2 + 4 in all, but unit 0 holds one task only
    wrong_cost, wrong_units = total_load_dp(costs, loads, caps)
    on_unit0 = sum(w for w, j in zip(loads, wrong_units) if j == 0)
    assert wrong_cost == 3.0 and on_unit0 == 6 > caps[0]  # "cheaper" only because unit 0 is overfilled
    right = assign(costs, loads, caps)
    assert is_feasible(right, costs, loads, caps)
    assert right.unit_load == (2.0, 4.0) and right.cost == 11.0 == exhaustive(costs, loads, caps, "total")


def test_bottleneck_objective_balances_the_units():
    costs = [[3.0, 3.0]] * 4
    result = assign(costs, [1] * 4, None, objective="max")
    assert result.cost == 6.0 and result.unit_cost == (6.0, 6.0)
    assert assign(costs, [1] * 4, None).cost == 12.0  # total: any split


def test_infeasible_instances_name_what_is_needed_and_available():
    with pytest.raises(UserError, match=r"need a load of 9 in all .* hold 8 in all"):
        assign([[1, 1], [1, 1], [1, 1]], [3, 3, 3], [4, 4])
    with pytest.raises(UserError, match="task 1 .* fits no unit"):
        assign([[1, 1], [1, np.inf]], [1, 5], [1, 4])


@pytest.mark.parametrize("costs,loads,caps,objective,message", [
    ([[1, 2]], [1, 2], [1, 1], "total", "2 loads for 1 tasks"),
    ([[1, 2]], [1], [1], "total", "1 capacities for 2 units"),
    ([[1, np.nan]], [1], [1, 1], "total", "numbers or inf"),
    ([[1, 2]], [-1], [1, 1], "total", "loads must be finite and >= 0"),
    ([[1, 2]], [1], [1, -1], "total", "capacities must be >= 0"),
    ([[1, 2]], [1], [1, 1], "sum", "objective must be one of"),
    ([], [], [], "total", "non-empty"),
])
def test_bad_inputs_are_one_clear_line(costs, loads, caps, objective, message):
    with pytest.raises(UserError, match=message):
        assign(costs, loads, caps, objective)

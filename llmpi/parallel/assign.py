"""The general allocation problem: N tasks onto M units, each task on exactly one unit, every unit
within its capacity, at least cost (the generalised assignment problem).

    x_ij in {0, 1},   sum_j x_ij = 1            (task i runs on exactly one unit)
                      sum_i W_i x_ij <= L_j     (unit j holds at most its capacity)
    objective "total": minimise sum_ij C_ij x_ij
    objective "max":   minimise max_j sum_i C_ij x_ij   (the bottleneck unit), written as the
                       MILP  min z  s.t.  sum_i C_ij x_ij <= z  for every unit j.

C_ij = inf forbids task i on unit j (x_ij is fixed to 0). The problem is NP-hard (bin packing is
its special case C = 0), so `assign` solves it exactly as this mixed-integer program with
scipy.optimize.milp (HiGHS branch and bound, relative gap 0: the optimum, not a bound).
`greedy` and `anneal` are the heuristics; `compare` reports each one's gap to the optimum.

Why not a dynamic program over the load: the knapsack recursion whose state is the total load
placed so far (one running sum) only enforces sum_i W_i <= sum_j L_j, so it can put more on one
unit than that unit holds (tests/test_assign.py has such an instance). An exact DP needs every
unit's own load in its state, prod_j (L_j + 1) states, which is what the integer program avoids.

A load fits when it is at most the capacity plus a relative 1e-9, so float rounding of a sum
never turns a fitting assignment into an overfilled one. No MPI here: pure functions.
"""
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

OBJECTIVES = ("total", "max")
SLACK = 1e-9  # relative tolerance of "load <= capacity"


@dataclass(frozen=True)
class Assignment:
    units: tuple  # units[i]: the unit that runs task i
    cost: float  # the objective's value: total cost, or the largest per-unit cost sum
    unit_load: tuple  # sum of the loads placed on each unit
    unit_cost: tuple  # sum of the costs placed on each unit
    method: str  # "milp", "greedy" or "anneal"

    def to_dict(self):
        return {"units": list(self.units), "cost": self.cost, "unit_load": list(self.unit_load),
                "unit_cost": list(self.unit_cost), "method": self.method}


def check(costs, loads, capacities, objective="total"):
    """(C (N, M), W (N,), L (M,)) as float arrays, or a UserError naming what is wrong.
    capacities None means unlimited (inf)."""
    if objective not in OBJECTIVES:
        raise UserError(f"assign: objective must be one of {', '.join(OBJECTIVES)} (got {objective!r})")
    try:
        C = np.array(costs, dtype=np.float64, ndmin=2)
        W = np.array(loads, dtype=np.float64).reshape(-1)
        L = np.full(C.shape[1], np.inf) if capacities is None else np.array(capacities, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError("assign: costs must be N rows of M numbers, loads N numbers, capacities M numbers") from None
    if C.ndim != 2 or C.size == 0:
        raise UserError(f"assign: costs must be a non-empty N x M table (got shape {C.shape})")
    N, M = C.shape
    if len(W) != N:
        raise UserError(f"assign: {len(W)} loads for {N} tasks (one per row of costs)")
    if len(L) != M:
        raise UserError(f"assign: {len(L)} capacities for {M} units (one per column of costs)")
    if np.isnan(C).any() or (C == -np.inf).any():
        raise UserError("assign: costs must be numbers or inf (task forbidden on that unit)")
    if not (np.isfinite(W).all() and (W >= 0).all()):
        raise UserError(f"assign: loads must be finite and >= 0 (got {W.tolist()})")
    if np.isnan(L).any() or (L < 0).any():
        raise UserError(f"assign: capacities must be >= 0 (got {L.tolist()})")
    return C, W, L


def _fits(load, cap):
    return load <= cap + SLACK * max(1.0, abs(cap))


def _make(C, W, units, objective, method):
    units = tuple(int(j) for j in units)
    M = C.shape[1]
    unit_load, unit_cost = np.zeros(M), np.zeros(M)
    for i, j in enumerate(units):
        unit_load[j] += W[i]
        unit_cost[j] += C[i, j]
    cost = float(unit_cost.sum() if objective == "total" else unit_cost.max())
    return Assignment(units, cost, tuple(unit_load.tolist()), tuple(unit_cost.tolist()), method)


def _infeasible(C, W, L):
    """The UserError for an instance with no feasible assignment: what was needed and available."""
    for i in range(len(W)):
        if not any(np.isfinite(C[i, j]) and _fits(W[i], L[j]) for j in range(len(L))):
            return UserError(f"assign: task {i} (load {W[i]:g}) fits no unit it may run on; "
                             f"capacities are {', '.join(f'{c:g}' for c in L)}")
    return UserError(f"assign: no assignment fits the capacities: the {len(W)} tasks need a load of "
                     f"{W.sum():g} in all (largest {W.max():g}), the {len(L)} units hold {L.sum():g} in all "
                     f"(largest {L.max():g}); raise the capacities or lower the loads")


def solve(costs, loads, capacities, objective="total"):
    """The exact optimum as an Assignment, or None if no assignment fits (see the module docstring)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    C, W, L = check(costs, loads, capacities, objective)
    N, M = C.shape
    allowed = np.isfinite(C).reshape(-1)
    Cz = np.where(np.isfinite(C), C, 0.0).reshape(-1)
    n_x = N * M  # variable k = i * M + j is x_ij; with "max" one more, z, comes last
    n_vars = n_x + (objective == "max")
    task, cols = np.repeat(np.arange(N), M), np.arange(n_x)
    unit = cols % M
    constraints = [LinearConstraint(coo_matrix((np.ones(n_x), (task, cols)), shape=(N, n_vars)), 1, 1)]
    finite = np.isfinite(L)
    if finite.any():
        load = coo_matrix((W[task], (unit, cols)), shape=(M, n_vars)).tocsr()[finite]
        constraints.append(LinearConstraint(load, -np.inf, L[finite] + SLACK * np.maximum(1.0, L[finite])))
    lo, hi = np.zeros(n_vars), np.r_[allowed.astype(np.float64), np.inf][:n_vars]
    integrality = np.r_[np.ones(n_x), 0.0][:n_vars]
    if objective == "total":
        c = Cz
    else:  # min z with every unit's cost sum - z <= 0
        c = np.r_[np.zeros(n_x), 1.0]
        lo[-1] = -np.inf
        rows, entries = np.r_[unit, np.arange(M)], np.r_[Cz, -np.ones(M)]
        unit_sum = coo_matrix((entries, (rows, np.r_[cols, np.full(M, n_x)])), shape=(M, n_vars))
        constraints.append(LinearConstraint(unit_sum, -np.inf, 0.0))
    res = milp(c, integrality=integrality, bounds=Bounds(lo, hi), constraints=constraints,
               options={"mip_rel_gap": 0.0})
    if res.status == 2:
        return None
    if res.status != 0:
        raise RuntimeError(f"assign: milp stopped without the optimum ({res.message})")
    units = res.x[:n_x].reshape(N, M).argmax(axis=1)
    return _make(C, W, units, objective, "milp")


def assign(costs, loads, capacities, objective="total"):
    """The exact optimum: an Assignment, or one UserError line if no assignment fits.

    costs: N x M (C_ij, inf = forbidden), loads: N, capacities: M or None (unlimited),
    objective "total" (sum of costs) or "max" (largest per-unit cost sum)."""
    result = solve(costs, loads, capacities, objective)
    if result is None:
        raise _infeasible(*check(costs, loads, capacities, objective))
    return result


def greedy(costs, loads, capacities, objective="total"):
    """Largest load first, each task onto the unit with room that raises the objective least
    (total: the cheapest unit; max: the smallest resulting unit sum). None if it gets stuck."""
    C, W, L = check(costs, loads, capacities, objective)
    N, M = C.shape
    unit_load, unit_cost = np.zeros(M), np.zeros(M)
    units = [0] * N
    for i in sorted(range(N), key=lambda i: (-W[i], i)):
        room = [j for j in range(M) if np.isfinite(C[i, j]) and _fits(unit_load[j] + W[i], L[j])]
        if not room:
            return None
        if objective == "total":
            j = min(room, key=lambda j: (C[i, j], j))
        else:
            j = min(room, key=lambda j: (unit_cost[j] + C[i, j], C[i, j], j))
        units[i] = j
        unit_load[j] += W[i]
        unit_cost[j] += C[i, j]
    return _make(C, W, units, objective, "greedy")


def anneal(costs, loads, capacities, objective="total", seed=0, steps=None):
    """Simulated annealing from the greedy start (or the cheapest units when greedy is stuck):
    a move puts one task on another unit or swaps two tasks' units; energy = objective +
    penalty x overfill, the penalty such that overfilling a unit by the smallest load costs
    more than any difference in cost; a move is accepted with probability
    exp(-dE / T), T cooling geometrically from the cost spread to 1e-3 of it. Deterministic for
    a seed. Returns the best feasible assignment seen, or None if it saw none."""
    C, W, L = check(costs, loads, capacities, objective)
    N, M = C.shape
    rng = np.random.default_rng(seed)
    steps = steps or 1000 + 200 * N
    allowed = [np.flatnonzero(np.isfinite(C[i])) for i in range(N)]
    if any(len(a) == 0 for a in allowed):
        return None
    finite = C[np.isfinite(C)]
    spread = float(finite.max() - finite.min()) or 1.0
    smallest = float(W[W > 0].min()) if (W > 0).any() else 1.0
    penalty = 10.0 * (np.abs(finite).sum() + 1.0) / smallest
    start = greedy(costs, loads, capacities, objective)
    units = np.array(start.units if start else [a[np.argmin(C[i, a])] for i, a in enumerate(allowed)])
    unit_load = np.bincount(units, weights=W, minlength=M)
    unit_cost = np.bincount(units, weights=C[np.arange(N), units], minlength=M)

    room = L + SLACK * np.maximum(1.0, np.abs(L))

    def energy():
        over = np.where(unit_load <= room, 0.0, unit_load - L)
        return (unit_cost.sum() if objective == "total" else unit_cost.max()) + penalty * over.sum(), not over.any()

    def move(i, j):
        unit_load[units[i]] -= W[i]
        unit_cost[units[i]] -= C[i, units[i]]
        units[i] = j
        unit_load[j] += W[i]
        unit_cost[j] += C[i, j]

    e, ok = energy()
    best = units.copy() if ok else None
    best_e = e if ok else np.inf
    for k in range(steps):
        T = spread * 1e-3 ** (k / steps)
        i = int(rng.integers(N))
        undo = [(i, units[i])]
        if N > 1 and rng.random() < 0.5:
            q = int(rng.integers(N))
            if not (np.isfinite(C[i, units[q]]) and np.isfinite(C[q, units[i]])):
                continue
            undo.append((q, units[q]))
            ji, jq = units[q], units[i]
            move(i, ji)
            move(q, jq)
        else:
            move(i, int(rng.choice(allowed[i])))
        e_new, ok = energy()
        if e_new <= e or rng.random() < np.exp(-(e_new - e) / T):
            e = e_new
            if ok and e < best_e:
                best, best_e = units.copy(), e
        else:
            for t, j in reversed(undo):
                move(t, j)
    return None if best is None else _make(C, W, best, objective, "anneal")


def gap(result, optimum):
    """Relative gap (cost - optimum) / |optimum| of a heuristic's result: 0 when it is optimal,
    inf when it found no feasible assignment (or the optimum is 0 and it is not)."""
    if result is None:
        return float("inf")
    if optimum.cost == 0:
        return 0.0 if result.cost == 0 else float("inf")
    return (result.cost - optimum.cost) / abs(optimum.cost)


def compare(costs, loads, capacities, objective="total", seed=0):
    """The optimum and both heuristics with their gaps:
    {"optimum": Assignment, "greedy": Assignment | None, "anneal": Assignment | None,
     "gap": {"greedy": float, "anneal": float}}. UserError if no assignment fits."""
    optimum = assign(costs, loads, capacities, objective)
    found = {"greedy": greedy(costs, loads, capacities, objective),
             "anneal": anneal(costs, loads, capacities, objective, seed)}
    return {"optimum": optimum, **found, "gap": {k: gap(v, optimum) for k, v in found.items()}}

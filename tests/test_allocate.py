"""llmpi.parallel.allocate: exact optimality against brute force, capacity, Balancer policies, and
the weighted-gradient identity the trainer relies on. Single-process (each rank of an
`mpiexec -n 4 pytest` run checks the same things independently)."""
import heapq
import itertools

import numpy as np
import pytest

from llmpi.parallel.allocate import Balancer, allocate, even_split, step_time
from llmpi.errors import UserError


def greedy_reference(times, caps, B):
    """The textbook greedy: next sample to the rank whose time after taking it is smallest."""
    counts = [0] * len(times)
    heap = [(t, r) for r, t in enumerate(times) if caps[r] > 0]
    heapq.heapify(heap)
    for _ in range(B):
        _, r = heapq.heappop(heap)
        counts[r] += 1
        if counts[r] < caps[r]:
            heapq.heappush(heap, ((counts[r] + 1) * times[r], r))
    return counts


def brute_force_best(times, caps, B):
    best = None
    for n in itertools.product(*(range(c + 1) for c in caps)):
        if sum(n) == B:
            t = step_time(n, times)
            best = t if best is None else min(best, t)
    return best


def capacity_patterns(P, B):
    yield [B] * P  # unconstrained
    yield [-(-B // P)] * P  # tight: even split exactly fits
    yield [B if r == 0 else 1 for r in range(P)]  # only rank 0 can take many
    yield [0] + [B] * (P - 1)  # rank 0 holds nothing


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_optimal_against_brute_force_on_all_small_cases(P):
    grid = (0.5, 1.0, 3.0) if P == 4 else (0.5, 1.0, 1.5, 3.0)
    checked = 0
    for times in itertools.product(grid, repeat=P):
        for B in range(0, 9):
            for caps in capacity_patterns(P, B):
                if sum(caps) < B:
                    continue
                n = allocate(times, caps, B)
                assert sum(n) == B and all(0 <= x <= c for x, c in zip(n, caps))
                assert step_time(n, times) == pytest.approx(brute_force_best(times, caps, B), abs=0)
                assert n == greedy_reference(list(times), caps, B), (times, caps, B)
                checked += 1
    assert checked > 100


def test_matches_greedy_on_larger_random_cases_including_float_ties():
    rng = np.random.default_rng(0)
    for trial in range(200):
        P = int(rng.integers(1, 9))
        # Multiples of 0.1 make products like 3 * 0.1 vs 0.3 collide up to rounding.
        times = [round(float(x), 1) for x in rng.integers(1, 6, P) * 0.1] if trial % 2 else \
            list(rng.uniform(0.01, 2.0, P))
        caps = [int(c) for c in rng.integers(0, 300, P)]
        B = int(rng.integers(0, sum(caps) + 1))
        assert allocate(times, caps, B) == greedy_reference(times, caps, B)


def test_large_batch_is_fast_and_proportional():
    n = allocate([1.0, 2.0, 4.0, 4.0], None, 100_000)
    assert sum(n) == 100_000
    assert n == [50_000, 25_000, 12_500, 12_500]


def test_capacity_scalar_none_and_zero_batch():
    assert allocate([1.0, 1.0, 1.0], 2, 6) == [2, 2, 2]
    assert allocate([1.0, 9.0], 3, 4) == [3, 1]  # the fast rank is full
    assert allocate([1.0, 1.0], None, 0) == [0, 0]
    assert allocate([1.0, 100.0], None, 3) == [3, 0]  # a very slow rank may get nothing


@pytest.mark.parametrize("times, caps, B, words", [
    ([1.0, 1.0], [2, 2], 5, "exceeds the total capacity 4"),
    ([1.0, 0.0], None, 4, "rank 1"),
    ([1.0, -1.0], None, 4, "positive"),
    ([1.0, float("nan")], None, 4, "positive"),
    ([1.0, 1.0], [1, 2, 3], 2, "3 capacities for 2 ranks"),
    ([1.0, 1.0], [1, -1], 0, "non-negative"),
    ([1.0], None, -1, "global batch"),
    ([], None, 1, "at least one rank"),
])
def test_bad_inputs_are_user_errors(times, caps, B, words):
    with pytest.raises(UserError, match=words):
        allocate(times, caps, B)


def test_even_split_and_offsets():
    assert even_split(4, 10) == [3, 3, 2, 2]
    b = Balancer(4, 10)
    assert b.counts == [3, 3, 2, 2] and b.offsets == [0, 3, 6, 8]


def simulate(balancer, speeds, steps, noise=0.0, seed=0, start=0):
    """Feed the balancer noisy timings; return the allocation after every step."""
    rng = np.random.default_rng(seed)
    history = []
    for step in range(start, start + steps):
        t = [s * (1.0 + rng.uniform(-noise, noise)) if n > 0 else float("nan")
             for s, n in zip(speeds, balancer.counts)]
        balancer.observe(t)
        balancer.maybe_rebalance(step)
        history.append(list(balancer.counts))
    return history


def test_slowed_rank_gets_about_half():
    b = Balancer(4, 64, mode="static", warmup=3)
    simulate(b, [1e-3, 1e-3, 2e-3, 1e-3], steps=5)
    n = b.counts
    assert sum(n) == 64
    assert abs(n[2] / np.mean([n[0], n[1], n[3]]) - 0.5) < 0.1, n


def test_dynamic_is_stable_under_noise():
    b = Balancer(4, 64, mode="dynamic", interval=5, warmup=5, smoothing=0.3, hysteresis=0.05)
    history = simulate(b, [1e-3, 1e-3, 2e-3, 1e-3], steps=400, noise=0.05, seed=1)
    settled = history[30]
    assert settled != even_split(4, 64)
    assert all(h == settled for h in history[30:]), "noise reshuffled a settled allocation"


def test_static_once_dynamic_follows_a_change():
    speeds = [1e-3, 1e-3, 1e-3, 1e-3]
    slow = [1e-3, 3e-3, 1e-3, 1e-3]
    static = Balancer(4, 40, mode="static", warmup=2)
    dynamic = Balancer(4, 40, mode="dynamic", warmup=2, interval=4)
    none = Balancer(4, 40, mode="none", warmup=2)
    for b in (static, dynamic, none):
        simulate(b, speeds, steps=10)
        assert b.counts == [10, 10, 10, 10]
        simulate(b, slow, steps=40, start=10)
    assert static.counts == [10, 10, 10, 10] and static.rebalances == 1
    assert none.counts == [10, 10, 10, 10]
    assert dynamic.counts[1] < 10 and sum(dynamic.counts) == 40
    assert dynamic.counts == allocate(slow, None, 40)


def test_no_rebalance_before_warmup_or_without_timings():
    b = Balancer(2, 10, mode="static", warmup=5)
    assert not b.maybe_rebalance(7)  # past warm-up but nothing observed yet
    b.observe([1.0, 4.0])
    assert not b.maybe_rebalance(3)
    assert b.maybe_rebalance(7) and b.counts == [8, 2]
    assert not b.maybe_rebalance(8)


def test_unmeasured_rank_keeps_estimate_and_median_fill():
    b = Balancer(3, 3, mode="dynamic", warmup=0, interval=1)
    b.observe([1.0, 1.0, float("nan")])  # rank 2 had no samples
    assert b.speeds() == [1.0, 1.0, 1.0]
    b.observe([2.0, 0.0, 3.0])
    assert b.estimates[1] == 1.0 and b.estimates[2] == 3.0


def test_capacity_respected_by_balancer():
    with pytest.raises(UserError, match="over its capacity"):
        Balancer(2, 10, capacity=[4, 8], mode="none")
    b = Balancer(2, 10, capacity=[4, 8], mode="dynamic", warmup=0, interval=1)
    assert b.counts == [4, 6]
    b.observe([1.0, 100.0])
    b.maybe_rebalance(0)
    assert b.counts == [4, 6]
    with pytest.raises(UserError, match="total capacity"):
        Balancer(2, 13, capacity=[4, 8], mode="static")


@pytest.mark.parametrize("kwargs, words", [
    ({"mode": "fast"}, "balance mode"), ({"interval": 0}, "interval"),
    ({"smoothing": 0.0}, "smoothing"), ({"hysteresis": 1.0}, "hysteresis"), ({"warmup": -1}, "warm-up"),
])
def test_bad_balancer_settings(kwargs, words):
    with pytest.raises(UserError, match=words):
        Balancer(2, 8, **kwargs)


def test_state_dict_round_trip_and_mismatch():
    b = Balancer(3, 30, mode="dynamic", warmup=0, interval=1)
    b.observe([1.0, 2.0, 1.0])
    b.maybe_rebalance(0)
    state = b.state_dict()
    assert all(isinstance(v, (int, float)) or all(isinstance(x, (int, float)) for x in v)
               for v in state.values())
    c = Balancer(3, 30, mode="dynamic", warmup=0, interval=1)
    assert c.load_state_dict(state)
    assert c.counts == b.counts and c.estimates == b.estimates and c.offsets == b.offsets
    d = Balancer(4, 30, mode="dynamic")
    assert not d.load_state_dict(state) and d.counts == even_split(4, 30)


def test_weighted_rank_gradients_equal_the_single_process_gradient():
    """What the trainer does: rank r averages its n_r samples' gradients; the all-reduce
    sums n_r / B times that. The result must be the mean over all B samples, also when
    a rank has no samples."""
    rng = np.random.default_rng(0)
    B, D = 23, 5
    X, y, w = rng.normal(size=(B, D)), rng.normal(size=B), rng.normal(size=D)

    def mean_grad(Xs, ys):  # d/dw of mean 0.5 * (x.w - y)^2
        return Xs.T @ (Xs @ w - ys) / len(ys)

    full = mean_grad(X, y)
    b = Balancer(4, B, mode="static", warmup=0)
    b.observe([1.0, 1.0, 50.0, 2.0])
    b.maybe_rebalance(0)
    assert 0 in b.counts
    total = np.zeros(D)
    for r, (lo, n) in enumerate(zip(b.offsets, b.counts)):
        g = mean_grad(X[lo:lo + n], y[lo:lo + n]) if n else np.zeros(D)
        total += (n / B) * g
    np.testing.assert_allclose(total, full, rtol=1e-12, atol=1e-14)


def test_exchange_repairs_any_start():
    """The final exchange pass (a safety net for rounding in the closed-form start)
    turns any allocation of B samples into the optimal one."""
    from llmpi.parallel.allocate import _exchange
    assert _exchange([0, 4, 0], [1.0, 1.0, 2.0], [4, 4, 4]) == [2, 2, 0]
    assert _exchange([3, 0], [1.0, 1.0], [3, 1]) == [2, 1]


def test_dynamic_keeps_a_sample_on_every_rank_so_it_can_be_measured():
    """A rank at 0 samples reports no speed and keeps its old estimate: under dynamic balancing
    it could never get samples back. Static balancing allocates once, exactly."""
    dynamic = Balancer(2, 16, mode="dynamic", warmup=0, interval=1)
    dynamic.observe([1.0, 100.0])
    assert dynamic.maybe_rebalance(0) and dynamic.counts == [15, 1]
    static = Balancer(2, 16, mode="static", warmup=0)
    static.observe([1.0, 100.0])
    assert static.maybe_rebalance(0) and static.counts == allocate([1.0, 100.0], None, 16) == [16, 0]
    small = Balancer(3, 2, mode="dynamic", warmup=0, interval=1)  # batch < ranks: someone gets 0
    small.observe([1.0, 1.0, 100.0])
    small.maybe_rebalance(0)
    assert sorted(small.counts) == [0, 1, 1]

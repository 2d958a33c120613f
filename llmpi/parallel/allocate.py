"""Global work allocation: how many samples of the global batch each rank computes.

A synchronous step ends when the slowest rank is done, so with per-rank speeds
t_r (seconds per sample) the step time of an allocation n is max_r n_r * t_r.
`allocate` finds the integer allocation that minimises it exactly; `Balancer`
measures the speeds during training and decides when a new allocation is worth
adopting. The gradient stays the mean over all B samples because the trainer
weights rank r's mean gradient by n_r / B (tests/test_allocate.py checks this).
No MPI here: the trainer gathers the timings and passes them in.
"""
import heapq
import math

import numpy as np

from ..errors import UserError

MODES = ("none", "static", "dynamic")


def _check_inputs(time_per_sample, capacity, global_batch):
    times = [float(t) for t in time_per_sample]
    if not times:
        raise UserError("allocate: need the time per sample of at least one rank")
    bad = [r for r, t in enumerate(times) if not (math.isfinite(t) and t > 0)]
    if bad:
        raise UserError(f"allocate: time per sample must be a positive finite number of seconds; "
                        f"rank {bad[0]} has {times[bad[0]]!r}")
    if isinstance(global_batch, bool) or int(global_batch) != global_batch or global_batch < 0:
        raise UserError(f"allocate: global batch must be a non-negative integer (got {global_batch!r})")
    B = int(global_batch)
    if capacity is None:
        caps = [B] * len(times)
    elif np.ndim(capacity) == 0:
        caps = [capacity] * len(times)
    else:
        caps = list(capacity)
    if len(caps) != len(times):
        raise UserError(f"allocate: {len(caps)} capacities for {len(times)} ranks")
    for r, c in enumerate(caps):
        if isinstance(c, bool) or int(c) != c or c < 0:
            raise UserError(f"allocate: capacity must be a non-negative integer; rank {r} has {c!r}")
    caps = [int(c) for c in caps]
    if B > sum(caps):
        raise UserError(f"allocate: global batch {B} exceeds the total capacity {sum(caps)} of "
                        f"{len(caps)} ranks (per rank: {caps}); lower the batch or raise the capacity")
    return times, caps, B


def _water_level(times, caps, B):
    """The makespan M at which the fractional allocation min(cap_r, M / t_r) sums to B."""
    order = sorted(range(len(times)), key=lambda r: caps[r] * times[r])
    # Suffix sums rather than a running difference, so rounding never makes them <= 0.
    inv_rest = np.cumsum([1.0 / times[r] for r in reversed(order)])[::-1]
    saturated = 0
    for k, r in enumerate(order):
        level = (B - saturated) / inv_rest[k]
        if level <= caps[r] * times[r]:
            return level
        saturated += caps[r]
    return max(c * t for c, t in zip(caps, times))


def allocate(time_per_sample, capacity, global_batch):
    """Samples per rank: sum is `global_batch`, 0 <= n_r <= capacity_r, max_r n_r * t_r minimal.

    `capacity` is one int for every rank, a sequence of ints, or None (no limit).

    Why it is optimal. Call (j * t_r, r) the key of "rank r's j-th sample", for
    1 <= j <= capacity_r; keys are all distinct. An allocation takes a prefix
    1..n_r of every rank's slots, so it takes B slots, and its step time is the
    largest time among them. Any B distinct slots contain one whose key is at
    least the B-th smallest key, so no allocation beats the one made of the B
    smallest keys, and that set is a union of prefixes (keys grow with j), so it
    is an allocation. Exchange form: if an allocation uses a slot with a larger
    key than some unused slot, moving that sample to the unused slot's rank never
    raises the step time; repeat until no such pair is left. The result is what the
    greedy "give the next sample to the rank whose time after taking it is
    smallest, lowest rank on ties" produces, and is unique, so the answer is
    deterministic and the same on every rank.

    How it is computed (O(P log P), independent of B). Start from the fractional
    water level M (where sum_r min(cap_r, M / t_r) = B) and give each rank
    min(cap_r, floor(M / t_r)); that is at most B samples, all among the B smallest
    keys up to rounding. Then fill the remainder (at most P) greedily with a heap
    and finally apply the exchange above until none is left, which also repairs
    any floating-point rounding of the start.

    Ranks may get 0 samples when that is optimal (a rank much slower than the
    others, or a batch smaller than the world); the trainer must handle n_r = 0.
    """
    times, caps, B = _check_inputs(time_per_sample, capacity, global_batch)
    P = len(times)
    if B == 0:
        return [0] * P
    level = _water_level(times, caps, B)
    counts = [min(c, int(math.floor(level / t))) for c, t in zip(caps, times)]
    while sum(counts) > B:  # rounding overshoot: drop from the rank with the largest key
        r = max((r for r in range(P) if counts[r] > 0), key=lambda r: (counts[r] * times[r], r))
        counts[r] -= 1
    heap = [((counts[r] + 1) * times[r], r) for r in range(P) if counts[r] < caps[r]]
    heapq.heapify(heap)
    for _ in range(B - sum(counts)):
        _, r = heapq.heappop(heap)
        counts[r] += 1
        if counts[r] < caps[r]:
            heapq.heappush(heap, ((counts[r] + 1) * times[r], r))
    return _exchange(counts, times, caps)


def _exchange(counts, times, caps):
    """Move samples from the largest used key to the smallest unused one while that helps."""
    P = len(times)
    while True:
        used = max((counts[r] * times[r], r) for r in range(P) if counts[r] > 0)
        free = [((counts[r] + 1) * times[r], r) for r in range(P) if counts[r] < caps[r]]
        if not free or min(free) > used:
            return counts
        counts[used[1]] -= 1
        counts[min(free)[1]] += 1


def even_split(world_size, global_batch):
    """B // P samples each, plus one for the first B % P ranks."""
    q, rem = divmod(int(global_batch), int(world_size))
    return [q + (1 if r < rem else 0) for r in range(world_size)]


def step_time(counts, time_per_sample):
    """Predicted step time max_r n_r * t_r (ranks with no samples take no time)."""
    return max((n * t for n, t in zip(counts, time_per_sample) if n > 0), default=0.0)


class Balancer:
    """Measures per-rank seconds per sample and decides the allocation of the global batch.

    mode "none": always the even split. "static": one rebalance, at the first
    `maybe_rebalance(step)` with step >= warmup once timings exist. "dynamic":
    at step = warmup, warmup + interval, ...; a new allocation is adopted only if
    its predicted step time beats the current one's by more than `hysteresis`
    (a fraction), so timing noise does not reshuffle the batch every interval.

    Estimates are exponential moving averages with weight `smoothing` on the
    newest observation, seeded by the first one. Warm-up should be long enough for
    the average to forget one-time costs (compilation, caches) of the first steps.
    A rank with no samples cannot measure its speed; it reports a non-finite or
    non-positive value, which keeps its last estimate (or, before it has one, the
    median of the known ranks).
    """

    def __init__(self, world_size, global_batch, capacity=None, mode="none", interval=50,
                 warmup=10, smoothing=0.3, hysteresis=0.05):
        if mode not in MODES:
            raise UserError(f"balance mode must be one of {', '.join(MODES)} (got {mode!r})")
        if int(world_size) < 1:
            raise UserError(f"world size must be at least 1 (got {world_size!r})")
        if int(interval) < 1:
            raise UserError(f"rebalance interval must be at least 1 step (got {interval!r})")
        if int(warmup) < 0:
            raise UserError(f"rebalance warm-up must be >= 0 steps (got {warmup!r})")
        if not 0.0 < float(smoothing) <= 1.0:
            raise UserError(f"smoothing must be in (0, 1] (got {smoothing!r})")
        if not 0.0 <= float(hysteresis) < 1.0:
            raise UserError(f"hysteresis must be in [0, 1) (got {hysteresis!r})")
        self.world_size = int(world_size)
        self.global_batch = int(global_batch)
        self.capacity = capacity
        self.mode = mode
        self.interval = int(interval)
        self.warmup = int(warmup)
        self.smoothing = float(smoothing)
        self.hysteresis = float(hysteresis)
        # Fail now, not at the first rebalance, if the batch does not fit.
        _, self._caps, _ = _check_inputs([1.0] * self.world_size, capacity, self.global_batch)
        self.counts = self._initial_counts()
        self.estimates = [0.0] * self.world_size  # 0.0 = not measured yet
        self.observations = 0
        self.rebalances = 0

    def _initial_counts(self):
        """The even split; if it overfills a rank, the balanced modes start from the
        equal-speed allocation that respects capacity instead."""
        counts = even_split(self.world_size, self.global_batch)
        over = [r for r in range(self.world_size) if counts[r] > self._caps[r]]
        if not over:
            return counts
        if self.mode == "none":
            r = over[0]
            raise UserError(f"the even split gives rank {r} {counts[r]} samples, over its capacity "
                            f"{self._caps[r]}; use a smaller batch or a balance mode that respects capacity")
        return allocate([1.0] * self.world_size, self._caps, self.global_batch)

    @property
    def offsets(self):
        """Where each rank's share starts in the global batch (exclusive prefix sums)."""
        return [int(x) for x in np.concatenate([[0], np.cumsum(self.counts)[:-1]])]

    def observe(self, time_per_sample):
        """Fold in one step's seconds per sample of every rank (same list on every rank)."""
        if len(time_per_sample) != self.world_size:
            raise ValueError(f"expected {self.world_size} timings, got {len(time_per_sample)}")
        a = self.smoothing
        for r, x in enumerate(time_per_sample):
            x = float(x)
            if not (math.isfinite(x) and x > 0):
                continue
            old = self.estimates[r]
            self.estimates[r] = x if old == 0.0 else a * x + (1.0 - a) * old
        self.observations += 1

    def speeds(self):
        """Current seconds-per-sample estimates, unmeasured ranks filled with the median, or None."""
        known = [e for e in self.estimates if e > 0]
        if not known:
            return None
        fill = float(np.median(known))
        return [e if e > 0 else fill for e in self.estimates]

    def maybe_rebalance(self, step) -> bool:
        """Recompute the allocation if the mode says so at this step; True if it changed."""
        if self.mode == "none" or step < self.warmup:
            return False
        if self.mode == "static" and self.rebalances > 0:
            return False
        if self.mode == "dynamic" and (step - self.warmup) % self.interval != 0:
            return False
        t = self.speeds()
        if t is None:
            return False
        new = allocate(t, self._caps, self.global_batch)
        if self.mode == "dynamic":
            new = self._keep_one_each(new, t)
        if self.mode == "static":
            self.rebalances += 1
        elif step_time(new, t) >= step_time(self.counts, t) * (1.0 - self.hysteresis):
            return False
        changed = new != self.counts
        self.counts = new
        if self.mode == "dynamic" and changed:
            self.rebalances += 1
        return changed

    def _keep_one_each(self, counts, t):
        """A rank with no samples measures nothing and keeps its old estimate, so under dynamic
        balancing it could never win samples back (with a fixed per-step cost, a rank given few
        samples looks slow per sample, gets fewer, and ends at 0). When the batch allows, such a
        rank gets one sample from the rank that finishes last."""
        counts = list(counts)
        if self.global_batch < self.world_size:
            return counts
        for r in range(self.world_size):
            if counts[r] == 0 and self._caps[r] > 0:
                donor = max((q for q in range(self.world_size) if counts[q] > 1),
                            key=lambda q: (counts[q] * t[q], q))
                counts[donor] -= 1
                counts[r] += 1
        return counts

    def state_dict(self):
        """Plain ints and floats (lists of them), for the HDF5 checkpoint."""
        return {"world_size": self.world_size, "global_batch": self.global_batch,
                "counts": [int(n) for n in self.counts], "estimates": [float(e) for e in self.estimates],
                "observations": int(self.observations), "rebalances": int(self.rebalances)}

    def load_state_dict(self, state):
        """Restore a checkpoint's state. A state from another world size or global batch
        does not describe this job's ranks, so it is ignored (the even split stays)."""
        if int(state["world_size"]) != self.world_size or int(state["global_batch"]) != self.global_batch:
            return False
        counts = [int(n) for n in state["counts"]]
        if sum(counts) == self.global_batch and all(0 <= n <= c for n, c in zip(counts, self._caps)):
            self.counts = counts
        self.estimates = [float(e) for e in state["estimates"]]
        self.observations = int(state["observations"])
        self.rebalances = int(state["rebalances"])
        return True

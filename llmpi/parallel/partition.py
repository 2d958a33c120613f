"""Pipeline stages: which contiguous blocks each stage holds and which rank runs it, chosen to
minimise the predicted step time within every rank's memory.

The model, used everywhere (the planner, `evaluate`, llmpi.plan). S stages, stage s holds blocks
[b_s, b_{s+1}) of the L, stage 0 also the embedding, the last stage ln_f, the LM head and (S > 1)
a tied copy of wte; D replicas share the partition, slots[d][s] is the rank that runs stage s of
replica d (world = D x S), m micro-batches per replica and step, K = m + S - 1.
    t(r, s)  = sum_{b in s} block_time[r][b] + embedding_time[r] [s = 0] + head_time[r] [s = S-1]
               + send_time (from r to the next stage's rank) [s < S-1]
               forward + backward of one micro-batch and sending its activation
    a(r, s)  = sync_rate[r] x param_bytes(s)   the stage's data-parallel all-reduce + optimizer
    step     = K x max_{d,s} t(slots[d][s], s) + max_{d,s} a(slots[d][s], s) + tied_time [S > 1]
    memory(s) = state_factor x param_bytes(s) + in_flight(s) x activation_bytes(s) <= the memory
               limit of every rank of stage s, in_flight(s) = m (GPipe) or min(m, S - s) (1F1B),
               llmpi.parallel.pipeline.peak_in_flight.
K max t is the critical path when every stage takes the slowest one's time (m micro-batches through
it, S - 1 to fill and drain the pipe); the idle share predicted is 1 - sum_ranks m t / (D S K max t),
(S - 1) / (m + S - 1) for equal stages.

Exactness. A plan of stages s..S-1 from block b on a set of ranks is summarised by (T, A) =
(max t, max a) over its stages: the step K T + A + tied grows in both, and prefixing stage s-1
maps (T, A) to (max(t, T), max(a, A)), which keeps componentwise order; what stage s-1 can do
depends only on b, the free ranks and (per-pair send) the rank it sends to. So a pair dominated
in both is dropped per (ranks used, first rank, b), over every order of those ranks at once, and
the dynamic program that adds stages from the last backward (every D-subset of the free ranks,
every contiguous range that fits memory) ends with a Pareto set holding an optimum. It is the
enumeration of rank orders (NP-complete in general) with Held-Karp sharing, ~2^R S L^2 steps,
not R! L^2; ranks with identical figures are tried once per state. It runs while search_work
<= EXACT_WORK (S <= 8 with D = 1: L <= 139, or 74 with a per-pair send); beyond, a heuristic
says so (Plan.exact False): from ranks grouped by speed, alternate the exact partition for the
placement and the exact placement for the partition (`place`, by llmpi.parallel.assign) until
the step stops falling.

No MPI here: llmpi.parallel.profile measures the inputs; llmpi.plan and the runtime call these.
"""
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from .allocate import even_split
from .assign import solve
from .pipeline import SCHEDULES, peak_in_flight

PARTITIONS = ("auto", "uniform")  # or "a,b,c": blocks per stage
EXACT_WORK = 2e7  # search_work up to which the search is exhaustive (bounds its Python time)
MiB = float(1 << 20)


@dataclass
class PipelineCosts:
    """Measured or modelled figures of R ranks and L blocks (seconds per micro-batch, bytes)."""
    block_time: object  # (R, L) forward + backward of one micro-batch through block b on rank r
    embedding_time: object  # (R,) or one number: the embedding's forward + backward, stage 0 only
    head_time: object  # (R,) or one number: ln_f + LM head + loss, last stage only
    block_param_bytes: object  # (L,) or one number: parameter bytes of each block
    embedding_param_bytes: float = 0.0  # wte + wpe
    head_param_bytes: float = 0.0  # ln_f
    tied_param_bytes: float = 0.0  # the wte copy the last stage keeps when S > 1
    block_activation_bytes: object = 0.0  # (L,) or one number: kept for backward, per micro-batch
    head_activation_bytes: float = 0.0  # the head's, per micro-batch
    send_time: object = 0.0  # one number, or (R, R) from rank r to rank q (only with D = 1)
    sync_rate: object = 0.0  # (R,) or one number: seconds per parameter byte, all-reduce + optimizer
    tied_time: float = 0.0  # summing the two wte copies' gradients (S > 1)
    state_factor: float = 4.0  # bytes held per parameter byte: params, grads, AdamW m and v

    def __post_init__(self):
        bt = np.array(self.block_time, dtype=np.float64, ndmin=2)
        if bt.ndim != 2 or bt.size == 0:
            raise UserError(f"block_time must be R x L seconds (got shape {bt.shape})")
        self.block_time = bt
        R, L = bt.shape
        for names, n, what in ((("embedding_time", "head_time", "sync_rate"), R, "one per rank"),
                               (("block_param_bytes", "block_activation_bytes"), L, "one per block")):
            for name in names:
                v = np.array(getattr(self, name), dtype=np.float64)
                v = np.full(n, float(v)) if v.ndim == 0 else v
                if v.shape != (n,):
                    raise UserError(f"{name} needs one number or {n} ({what}), got {v.size}")
                setattr(self, name, v)
        send = np.array(self.send_time, dtype=np.float64)
        if send.shape not in ((), (R, R)):
            raise UserError(f"send_time must be one number or an R x R table for R = {R} ranks")
        self.send_time = float(send) if send.ndim == 0 else send
        for name, v in vars(self).items():
            if not (np.all(np.isfinite(v)) and np.all(np.asarray(v) >= 0)):
                raise UserError(f"{name} must be finite and >= 0")
        self.ranks, self.blocks = R, L  # not fields: derived from block_time


@dataclass(frozen=True)
class Plan:
    blocks: tuple  # blocks per stage
    slots: tuple  # slots[d][s]: the rank running stage s of replica d (llmpi.parallel.grid)
    micro_batches: int
    schedule: str
    step_time: float  # predicted seconds per step: compute_time + sync_time + tied_time
    compute_time: float  # K x the slowest stage time
    sync_time: float  # the slowest stage's all-reduce + optimizer
    tied_time: float  # the wte gradient sum (0 for S = 1)
    stage_time: tuple  # per stage, its slowest replica's t
    bubble: float  # predicted idle share of the ranks during the pipelined part
    memory: tuple  # bytes per stage
    capacity: tuple  # per stage the smallest memory limit of its ranks (inf: unlimited)
    fits: tuple  # per stage: memory <= capacity
    method: str  # "auto", "uniform" or "user"
    exact: bool  # auto: the search was exhaustive (always True for given partitions)
    bubble_balanced: float  # (S - 1) / (m + S - 1): the idle share of equal stages

    @property
    def order(self):
        """Stage -> rank of replica 0 (the whole order for D = 1)."""
        return self.slots[0]

    def to_dict(self):
        return dict(asdict(self), slots=[list(row) for row in self.slots],
                    capacity=[None if math.isinf(c) else c for c in self.capacity])


def parse_partition(spec, n_layer, S):
    """"a,b,c" (or a sequence) -> blocks per stage: S positive integers summing to n_layer."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        blocks = [int(str(x).strip()) for x in items]
    except ValueError:
        raise UserError(f"partition {spec!r} must be auto, uniform or blocks per stage like 1,3,1") from None
    if len(blocks) != S:
        raise UserError(f"partition {spec!r} has {len(blocks)} entries for {S} pipeline stages")
    if min(blocks) < 1:
        raise UserError(f"partition {spec!r}: every stage needs at least one block")
    if sum(blocks) != n_layer:
        raise UserError(f"partition {spec!r} sums to {sum(blocks)} blocks; the model has {n_layer} (model.n_layer)")
    return blocks


def _pareto(cands):
    """The entries (T, A, ...) not dominated in both T and A (the first of equal ones)."""
    kept = []
    for cand in sorted(cands, key=lambda c: (c[0], c[1])):
        if not kept or cand[1] < kept[-1][1]:
            kept.append(cand)
    return kept


def search_work(R, S, L, matrix=False):
    """The exact search's work: (state, group) transitions x L^2 ranges."""
    D = R // S
    states = [math.comb(R, k * D) * (k if matrix and k else 1) for k in range(S)]
    return sum(n * math.comb(R - k * D, D) for k, n in enumerate(states)) * L * L


class _Stages:
    """The model of the module docstring for one (S, m, schedule, memory limit), with prefix sums
    so that any contiguous range costs O(1)."""

    def __init__(self, costs, S, m, schedule, memory_limit):
        R, L = costs.ranks, costs.blocks
        if schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")
        if isinstance(m, bool) or int(m) != m or m < 1:
            raise UserError(f"micro-batches must be a positive integer (got {m!r})")
        if isinstance(S, bool) or int(S) != S or not 1 <= S <= L or R % S:
            raise UserError(f"pipeline stages must divide the {R} ranks and be between 1 and the {L} blocks "
                            f"(got {S!r})")
        limit = np.array(np.inf if memory_limit is None else memory_limit, dtype=np.float64)
        limit = np.broadcast_to(limit, (R,)) if limit.ndim == 0 else limit
        if limit.shape != (R,) or np.isnan(limit).any() or (limit < 0).any():
            raise UserError(f"memory limit needs one value or {R} (one per rank), each >= 0")
        self.costs, self.S, self.m, self.schedule, self.cap = costs, int(S), int(m), schedule, limit
        self.D, self.L, self.K = R // S, L, int(m) + int(S) - 1
        self.tied = float(costs.tied_time) if S > 1 else 0.0
        self.BT = np.concatenate([np.zeros((R, 1)), np.cumsum(costs.block_time, axis=1)], axis=1)
        self.PB = np.r_[0.0, np.cumsum(costs.block_param_bytes)]
        self.AB = np.r_[0.0, np.cumsum(costs.block_activation_bytes)]
        matrix = np.ndim(costs.send_time) == 2
        if matrix and self.D > 1:
            raise UserError("a per-pair send_time needs one replica (D = 1); with D > 1 give one number")
        figures = [(tuple(costs.block_time[r]), costs.embedding_time[r], costs.head_time[r],
                    costs.sync_rate[r], limit[r]) for r in range(R)]
        self.sig = list(range(R)) if matrix else [figures.index(f) for f in figures]
        self._matrices = {}

    def in_flight(self, s):
        return peak_in_flight(self.schedule, self.S, s, self.m)

    def send(self, s, r, nxt):
        send = self.costs.send_time
        return 0.0 if s == self.S - 1 else float(send) if np.ndim(send) == 0 else float(send[r, nxt])

    def extras(self, s):
        """(param bytes, activation bytes) stage s holds besides its blocks."""
        c, last = self.costs, s == self.S - 1
        params = c.embedding_param_bytes * (s == 0) + (c.head_param_bytes + c.tied_param_bytes * (self.S > 1)) * last
        return params, c.head_activation_bytes * last

    def time(self, r, s, b, e):
        c, last = self.costs, s == self.S - 1
        return self.BT[r, e] - self.BT[r, b] + c.embedding_time[r] * (s == 0) + c.head_time[r] * last

    def param_bytes(self, s, b, e):
        return self.PB[e] - self.PB[b] + self.extras(s)[0]

    def memory(self, s, b, e):
        acts = self.AB[e] - self.AB[b] + self.extras(s)[1]
        return self.costs.state_factor * self.param_bytes(s, b, e) + self.in_flight(s) * acts

    def matrices(self, s, group, send):
        """T[b][e], A[b][e], fits[b][e] of stage s on `group` for every range [b, e) (lists)."""
        key = (s, group, send)
        if key not in self._matrices:
            g, c = list(group), self.costs
            extra = c.embedding_time[g] * (s == 0) + c.head_time[g] * (s == self.S - 1)
            T = (self.BT[g][:, None, :] - self.BT[g][:, :, None] + extra[:, None, None]).max(axis=0) + send
            params, acts = self.extras(s)
            P = self.PB[None, :] - self.PB[:, None] + params
            memory = c.state_factor * P + self.in_flight(s) * (self.AB[None, :] - self.AB[:, None] + acts)
            self._matrices[key] = (T.tolist(), (c.sync_rate[g].max() * P).tolist(),
                                   (memory <= self.cap[g].min()).tolist())
        return self._matrices[key]

    def starts(self, s):
        return [0] if s == 0 else range(s, self.L - (self.S - s) + 1)

    def table(self, s, group, send, nxt):
        """Per first block b, the Pareto set of (T, A, end, index in nxt[end]) of stages s..S-1."""
        T, A, fits = self.matrices(s, group, send)
        L, out = self.L, [[] for _ in range(self.L + 1)]
        for b in self.starts(s):
            out[b] = _pareto([(max(T[b][e], T2), max(A[b][e], A2), e, j)
                              for e in range(b + 1, L - (self.S - 1 - s) + 1) if fits[b][e]
                              for j, (T2, A2, *_) in enumerate(nxt[e])])
        return out

    def candidates(self, remaining):
        """The D-subsets of `remaining`, one per multiset of rank figures, highest ranks first
        (the search adds the last stage first, so ties keep the ranks in stage order)."""
        seen = set()
        for g in itertools.combinations(sorted(remaining, reverse=True), self.D):
            key = tuple(sorted(self.sig[r] for r in g))
            if key not in seen:
                seen.add(key)
                yield tuple(sorted(g))

    def search(self, fixed=None):
        """(step, blocks, groups) of the best plan over every ordered grouping, or over the one
        grouping `fixed` (S tuples of D ranks); (inf, None, None) if nothing fits memory."""
        S, L, matrix = self.S, self.L, np.ndim(self.costs.send_time) == 2
        everyone = frozenset(range(self.costs.ranks))
        empty = [[] for _ in range(L)] + [[(0.0, 0.0)]]  # no stage yet: (T, A) = 0 at block L
        layers = [{(frozenset(), None): empty}]  # layers[S - s]: the states after adding stage s
        for s in reversed(range(S)):
            layer = {}
            for (used, first), nxt in layers[-1].items():
                for g in ([fixed[s]] if fixed else self.candidates(everyone - used)):
                    tab = self.table(s, g, self.send(s, g[0], first), nxt)
                    if not any(tab):  # nothing fits memory from here
                        continue
                    merged = layer.setdefault((used | set(g), g[0] if matrix else None), [[] for _ in range(L + 1)])
                    for b in self.starts(s):
                        merged[b] += [(T, A, e, j, (used, first), g) for T, A, e, j in tab[b]]
            for tables in layer.values():
                tables[:] = [_pareto(cands) for cands in tables]
            layers.append(layer)
        best = min(((self.K * entry[0] + entry[1] + self.tied, i, key, k) for i, (key, tables) in
                    enumerate(layers[S].items()) for k, entry in enumerate(tables[0])), default=None)
        if best is None:
            return math.inf, None, None
        step, _, key, k = best
        blocks, groups, b = [], [], 0
        for s in range(S):  # follow the links (end, index, state) from stage 0 to the last
            _, _, e, k, next_key, g = layers[S - s][key][b][k]
            blocks.append(e - b)
            groups.append(g)
            key, b = next_key, e
        return step, blocks, groups

    def least_memory(self):
        """(largest stage, all stages, blocks) of the partition whose largest stage needs least."""
        S, L = self.S, self.L
        best = {L: (0.0, 0.0, [])}
        for s in reversed(range(S)):
            ends = [L] if s == S - 1 else range(1, L + 1)
            best = {b: min((max(self.memory(s, b, e), best[e][0]), self.memory(s, b, e) + best[e][1],
                            [e - b] + best[e][2]) for e in ends if e > b and e in best) for b in self.starts(s)}
        return best[0]


def evaluate(costs, blocks, slots, micro_batches, schedule="1f1b", memory_limit=None, method="user", exact=True):
    """The Plan (predicted step, bubble, memory per stage) of a given partition and placement."""
    S, D = len(blocks), len(slots)
    st = _Stages(costs, S, micro_batches, schedule, memory_limit)
    blocks = parse_partition(blocks, costs.blocks, S)
    slots = [list(map(int, row)) for row in slots]
    if D != st.D or any(len(row) != S for row in slots) or sorted(sum(slots, [])) != list(range(costs.ranks)):
        raise UserError(f"slots must place each of the {costs.ranks} ranks once in {st.D} x {S} (replica, stage)")
    edges = np.r_[0, np.cumsum(blocks)]
    stage_time, sync, memory, capacity, busy = [], [], [], [], 0.0
    for s in range(S):
        b, e = int(edges[s]), int(edges[s + 1])
        ranks = [row[s] for row in slots]
        times = [st.time(r, s, b, e) + st.send(s, r, row[s + 1] if s + 1 < S else None)
                 for r, row in zip(ranks, slots)]
        busy += st.m * sum(times)
        stage_time.append(float(max(times)))
        sync.append(float(max(costs.sync_rate[r] for r in ranks) * st.param_bytes(s, b, e)))
        memory.append(float(st.memory(s, b, e)))
        capacity.append(float(min(st.cap[r] for r in ranks)))
    compute = float(st.K * max(stage_time))
    idle = float(1.0 - busy / (costs.ranks * compute)) if compute else 0.0
    return Plan(tuple(blocks), tuple(tuple(row) for row in slots), st.m, schedule, compute + max(sync) + st.tied,
                compute, max(sync), st.tied, tuple(stage_time), idle, tuple(memory), tuple(capacity),
                tuple(m <= c for m, c in zip(memory, capacity)), method, exact, (S - 1) / st.K)


def _place(st, blocks):
    S, D, R, costs = st.S, st.D, st.costs.ranks, st.costs
    edges = np.r_[0, np.cumsum(blocks)]
    send = costs.send_time if np.ndim(costs.send_time) == 0 else costs.send_time.max(axis=1)
    t, a, ok = np.zeros((S, R)), np.zeros((S, R)), np.zeros((S, R), dtype=bool)
    for s in range(S):
        b, e = int(edges[s]), int(edges[s + 1])
        t[s] = np.array([st.time(r, s, b, e) for r in range(R)]) + (send if s < S - 1 else 0.0)
        a[s] = costs.sync_rate * st.param_bytes(s, b, e)
        ok[s] = st.memory(s, b, e) <= st.cap
    t, a, ok = np.tile(t, (D, 1)), np.tile(a, (D, 1)), np.tile(ok, (D, 1))  # row d S + s: slot (d, s)
    ones = np.ones(R)

    def step(found):
        return st.K * found.cost + max(a[i, j] for i, j in enumerate(found.units))

    free = solve(np.where(ok, t, np.inf), ones, ones, "max")
    if free is None:
        raise UserError(f"no placement of the {R} ranks fits the partition {','.join(map(str, blocks))} in memory")
    best, best_step = free, step(free)
    for tau in sorted(set(a[ok].tolist())):
        if st.K * free.cost + tau >= best_step:
            break
        found = solve(np.where(ok & (a <= tau), t, np.inf), ones, ones, "max")
        if found is not None and step(found) < best_step:
            best, best_step = found, step(found)
    return [[best.units[d * S + s] for s in range(S)] for d in range(D)]


def place(costs, blocks, micro_batches, schedule="1f1b", memory_limit=None):
    """slots (D lists of S ranks) of least step for a fixed partition: the D S (replica, stage) slots
    are tasks, the ranks units of one slot each, C = the stage's t on that rank (inf where it does not
    fit memory; a per-pair send bounded by the rank's slowest). For each threshold tau on a (slots with
    a > tau forbidden) the bottleneck assignment of t (assign's "max") is exact, so the least
    K max t + max a over the thresholds is the optimum; they stop once K x the free bottleneck + tau loses."""
    st = _Stages(costs, len(blocks), micro_batches, schedule, memory_limit)
    return _place(st, parse_partition(blocks, st.L, st.S))


def optimal(costs, S, micro_batches, schedule="1f1b", memory_limit=None, placed=False):
    """The `auto` Plan: partition and placement of least predicted step (module docstring); with
    `placed`, the partition of least step on the default slots (a tensor-parallel grid's)."""
    st = _Stages(costs, S, micro_batches, schedule, memory_limit)
    D = st.D
    exact = placed or search_work(costs.ranks, S, st.L, np.ndim(costs.send_time) == 2) <= EXACT_WORK
    if placed:
        step, blocks, groups = st.search([tuple(d * S + s for d in range(D)) for s in range(S)])
    elif exact:
        step, blocks, groups = st.search()
    else:
        speed = sorted(range(costs.ranks), key=lambda r: (st.time(r, 0, 0, st.L), r))
        groups = [tuple(sorted(speed[s * D:(s + 1) * D])) for s in range(S)]
        step, blocks, _ = st.search(groups)
        while True:
            slots = _place(st, blocks if blocks is not None else st.least_memory()[2])
            regrouped = [tuple(sorted(row[s] for row in slots)) for s in range(S)]
            new_step, new_blocks, _ = st.search(regrouped)
            if not new_step < step:
                break
            step, blocks, groups = new_step, new_blocks, regrouped
    if blocks is None:
        need, total, _ = st.least_memory()
        low, high = float(st.cap.min()) / MiB, float(st.cap.max()) / MiB
        offer = f"every rank offers {low:.1f} MiB" if low == high else f"the ranks offer {low:.1f} to {high:.1f} MiB"
        raise UserError(f"the model does not fit {S} pipeline stage(s) under the memory limits: the best "
                        f"partition of its {st.L} blocks needs {need / MiB:.1f} MiB on its largest stage "
                        f"({total / MiB:.1f} MiB in all stages) and {offer}; raise the memory limit or use "
                        f"more stages")
    slots = [[groups[s][d] for s in range(S)] for d in range(D)]
    return evaluate(costs, blocks, slots, micro_batches, schedule, memory_limit, "auto", exact)


def plan(costs, S, micro_batches, schedule="1f1b", memory_limit=None, partition="auto"):
    """The Plan of parallel.partition: "auto" (optimal), "uniform" (as even as possible by block
    count, the first L % S stages one more), or blocks per stage "a,b,c"; the latter two on the
    runtime's default slots (llmpi.parallel.grid), slots[d][s] = d S + s."""
    if partition == "auto":
        return optimal(costs, S, micro_batches, schedule, memory_limit)
    st = _Stages(costs, S, micro_batches, schedule, memory_limit)
    blocks = even_split(S, st.L) if partition == "uniform" else parse_partition(partition, st.L, S)
    return evaluate(costs, blocks, [[d * S + s for s in range(S)] for d in range(st.D)], micro_batches,
                    schedule, memory_limit, "uniform" if partition == "uniform" else "user")

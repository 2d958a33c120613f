"""Which token windows each rank trains on: sampling strategies and batch assembly.

`Sampler` turns (seed, rank, step) into window start offsets; `get_batch` turns starts
into (x, y) arrays on the device. See data/README.md for the strategies.
"""
import numpy as np

from ..errors import UserError

STRATEGIES = ("random", "contiguous", "strided", "hashed")


def splitmix64(x) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays: a fixed hash, unlike Python's hash()."""
    x = np.asarray(x, dtype=np.uint64)
    z = x.reshape(-1) + np.uint64(0x9E3779B97F4A7C15)  # 1-d: array ufuncs wrap silently, scalars warn
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))).reshape(x.shape)


class Sampler:
    """Window start offsets for one rank. data/README.md describes the strategies."""

    def __init__(self, n_tokens, block_size, seed=0, rank=0, world=1, strategy="random"):
        if strategy not in STRATEGIES:
            raise UserError(f"data.sharding must be one of {', '.join(STRATEGIES)} (got {strategy!r})")
        if n_tokens < block_size + 1:
            raise UserError(f"{n_tokens} tokens are fewer than block_size + 1 = {block_size + 1}; "
                            "use a bigger corpus or a smaller block_size")
        self.n_tokens, self.T, self.seed = int(n_tokens), int(block_size), int(seed)
        self.rank, self.world, self.strategy = int(rank), int(world), strategy
        self.epoch = self.pos = 0
        self._perm_epoch, self._perm = -1, None
        if strategy != "random":
            n_windows = (self.n_tokens - 1) // self.T
            owner = self._owners(n_windows)
            sizes = np.bincount(owner, minlength=self.world)
            if sizes.min() == 0:  # same verdict on every rank: no rank raises alone
                raise UserError(f"{n_windows} windows of {self.T + 1} tokens leave a rank without data under "
                                f"sharding {strategy!r} with {self.world} ranks; use a bigger corpus, "
                                "fewer ranks or sharding 'random'")
            self.shard = np.flatnonzero(owner == self.rank).astype(np.int64)

    def _owners(self, n):
        i = np.arange(n, dtype=np.int64)
        if self.strategy == "contiguous":
            return np.searchsorted(np.arange(1, self.world + 1) * n // self.world, i, side="right")
        if self.strategy == "strided":
            return i % self.world
        return (splitmix64(i) % np.uint64(self.world)).astype(np.int64)

    def _order(self, epoch):
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, self.rank, epoch])
            self._perm, self._perm_epoch = self.shard[rng.permutation(len(self.shard))], epoch
        return self._perm

    def starts(self, step, global_batch, offset=0, count=None) -> np.ndarray:
        """int64 (count,) start offsets of this rank's windows for `step`."""
        count = global_batch if count is None else count
        if self.strategy == "random":
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, self.n_tokens - self.T, size=global_batch)[offset:offset + count]
        out = []
        while count > 0:  # sharded: continue this rank's walk, crossing into the next epoch if needed
            order = self._order(self.epoch)
            take = min(count, len(order) - self.pos)
            out.append(order[self.pos:self.pos + take])
            self.pos += take
            count -= take
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return (np.concatenate(out) if out else np.zeros(0, np.int64)) * self.T

    def val_starts(self, eval_index, count, rank=None) -> np.ndarray:
        """int64 (count,) starts for evaluation batch `eval_index` on `rank`: items
        (eval_index * world + rank) * count + [0, count) of one fixed hashed sequence, so the
        union over ranks of a given global eval size is the same windows at any world size."""
        rank = self.rank if rank is None else rank
        j = (eval_index * self.world + rank) * count + np.arange(count, dtype=np.uint64)
        h = splitmix64(j + splitmix64(self.seed))
        return (h % np.uint64(self.n_tokens - self.T)).astype(np.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "world": self.world,
                "rank": self.rank, "n_tokens": self.n_tokens, "block_size": self.T,
                "strategy": STRATEGIES.index(self.strategy)}

    def load_state_dict(self, state: dict):
        if self.strategy != "random":
            saved = int(state.get("strategy", STRATEGIES.index(self.strategy)))  # older checkpoints lack it
            if STRATEGIES[saved] != self.strategy:
                raise UserError(f"the checkpoint's data sampler used sharding {STRATEGIES[saved]!r}, this run "
                                f"{self.strategy!r}: its position means another order; resume with "
                                f"data.sharding = {STRATEGIES[saved]!r}")
            for key in ("seed", "world", "n_tokens", "block_size"):
                if int(state[key]) != getattr(self, "T" if key == "block_size" else key):
                    raise UserError(f"the checkpoint's data sampler has {key} = {int(state[key])}, this run "
                                    f"{getattr(self, 'T' if key == 'block_size' else key)}; resume with the "
                                    "same data, seed and world size, or use sharding 'random'")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def get_batch(tokens, starts, block_size, xp=np):
    """(x, y) int64 (B, T) windows at `starts`: y is x shifted by one token."""
    starts = np.asarray(starts, dtype=np.int64)
    if isinstance(tokens, np.ndarray):
        w = tokens[starts[:, None] + np.arange(block_size + 1)]          # (B, T+1), stored dtype
    else:  # an h5py dataset: one read per window, in file order
        w = np.empty((len(starts), block_size + 1), dtype=tokens.dtype)
        for i in np.argsort(starts, kind="stable"):
            w[i] = tokens[starts[i]:starts[i] + block_size + 1]
    w = xp.asarray(w).astype(xp.int64)  # ship the narrow dtype, widen on the device
    return xp.ascontiguousarray(w[:, :-1]), xp.ascontiguousarray(w[:, 1:])

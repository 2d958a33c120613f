"""Where a training step's time goes, op by op, on the CPU or the GPU.

`timed_ops(model, clock)` wraps, for as long as it is open, every entry of the model's op table
(llmpi.model.ops: the layers, the matmuls, the optimizer's update and the grad norm) and the
refresh of the matrices the matmuls read (the bf16 casts on the GPU), so that each call is
timed by `clock` under one key per op and direction ("linear.forward", "attention.backward",
"project", ...). The table's members are shared by every GPT in the process (replicas of
llmpi.parallel.threaded included), so calls from every thread count; the originals are put
back on exit.

Clocks: HostClock adds up wall time around each call (the CPU's work is done when the call
returns); EventClock records a CUDA event before and after each call and reads the pairs once
the device is done: the host runs ahead of the GPU, so each pair brackets exactly the kernels
that call queued, and the time where the GPU idles waiting for the host shows as what the
step takes beyond the sum of the ops.
"""
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

PASSES = ("forward", "backward", "loss", "recompute")  # the members of a layer entry that are timed
NOT_OPS = ("weights", "precision", "activation_dtype")  # table entries that describe rather than compute


class _Clock:
    """Timing of the outermost timed call only: an op that calls another timed op counts once."""

    def __init__(self):
        self.calls = defaultdict(int)
        self._inside = threading.local()
        self._lock = threading.Lock()

    def time(self, key, fn, *args, **kwargs):
        if getattr(self._inside, "depth", 0):
            return fn(*args, **kwargs)
        self._inside.depth = 1
        try:
            return self._measure(key, fn, args, kwargs)
        finally:
            self._inside.depth = 0
            with self._lock:
                self.calls[key] += 1


class HostClock(_Clock):
    def __init__(self):
        super().__init__()
        self._total = defaultdict(float)

    def _measure(self, key, fn, args, kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        with self._lock:
            self._total[key] += dt
        return out

    def seconds(self):
        """{key: seconds} over all timed calls so far."""
        return dict(self._total)


class EventClock(_Clock):
    def __init__(self, cupy):
        super().__init__()
        self._cupy = cupy
        self._pairs = defaultdict(list)

    def _measure(self, key, fn, args, kwargs):
        start, end = self._cupy.cuda.Event(), self._cupy.cuda.Event()
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        self._pairs[key].append((start, end))
        return out

    def seconds(self):
        """{key: seconds} over all timed calls so far (waits for the last event)."""
        elapsed = self._cupy.cuda.get_elapsed_time  # milliseconds
        out = {}
        for key, pairs in self._pairs.items():
            pairs[-1][1].synchronize()
            out[key] = sum(elapsed(s, e) for s, e in pairs) / 1e3
        return out


def untimed(_key, fn, *args, **kwargs):
    """A clock's `time` that only calls: the same step code runs timed or not."""
    return fn(*args, **kwargs)


def _timed(clock, key, fn):
    def timed(*args, **kwargs):
        return clock.time(key, fn, *args, **kwargs)
    return timed


@contextmanager
def timed_ops(model, clock):
    """Time every op of `model` with `clock` while open (see the module docstring)."""
    saved = []  # (owner, attribute, original, whether the owner itself held it), undone in reverse

    def wrap(owner, attr, key):
        original = getattr(owner, attr)
        saved.append((owner, attr, original, attr in vars(owner)))
        setattr(owner, attr, _timed(clock, key, original))

    try:
        for name, member in list(vars(model.ops).items()):
            if name in NOT_OPS:
                continue
            if hasattr(member, "forward"):  # a layer: module or namespace with its passes
                for attr in PASSES:
                    if hasattr(member, attr):
                        wrap(member, attr, f"{name}.{attr}")
            else:
                wrap(model.ops, name, name)
        wrap(model.weights, "refresh", "weights.refresh")
        yield clock
    finally:
        for owner, attr, original, own in reversed(saved):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # a method: the class's own comes back


def per_step_ms(clock, steps, step_seconds):
    """{key: ms per step}, largest first, plus what the step took beyond the timed ops."""
    ms = {k: v * 1e3 / steps for k, v in clock.seconds().items()}
    ms["other (host, gaps)"] = max(step_seconds * 1e3 - sum(ms.values()), 0.0)
    return dict(sorted(ms.items(), key=lambda kv: -kv[1]))

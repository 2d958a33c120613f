"""Pipeline parallelism: the schedules, and one training step of one stage.

A replica's share of the batch is cut into m micro-batches; stage s runs forward (F) and
backward (B) of each, in the order its schedule gives:
  gpipe  all m forwards, then all m backwards: every micro-batch's activations are kept until
         its backward, so a stage holds m of them;
  1f1b   PipeDream-flush: S - s - 1 warm-up forwards, then one forward and one backward in turn,
         then the remaining backwards: stage s holds at most S - s micro-batches' activations.
Both take (m + S - 1) slots of one micro-batch's forward+backward per step, of which S - 1 are
idle on every stage: the bubble, (S - 1) / (m + S - 1) of the step for balanced stages.
Backwards run in micro-batch order in both schedules, so their gradients add up in the same
order and the two schedules give bitwise the same step.

Activations go forward and their gradients back through llmpi.comm.p2p (non-blocking, each
receive posted one action ahead of its use).
"""
import time

from ..comm.p2p import BACKWARD, FORWARD, Channel, tag
from ..errors import UserError

SCHEDULES = ("1f1b", "gpipe")  # parallel.schedule


def schedule(kind, S, s, m):
    """Stage s's actions for one step: [("F", i) | ("B", i)] over micro-batches i < m."""
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if kind != "1f1b":
        raise ValueError(f"unknown pipeline schedule {kind!r}; choose one of {SCHEDULES}")
    warm = min(S - s - 1, m)
    actions = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        actions += [("F", warm + i), ("B", i)]
    return actions + [("B", i) for i in range(m - warm, m)]


def peak_in_flight(kind, S, s, m):
    """Micro-batches whose activations stage s holds at once under the schedule."""
    return m if kind == "gpipe" else min(S - s, m)


def micro_batch_count(requested, smallest_share, S, batch_size):
    """parallel.micro_batches (0: up to 4 x S, as many as the smallest replica share allows), or a
    UserError when a replica's share cannot be cut that often."""
    m = requested or max(1, min(4 * S, smallest_share))
    if m > smallest_share:
        raise UserError(f"parallel.micro_batches = {m} exceeds a replica's share of {smallest_share} samples "
                        f"(train.batch_size = {batch_size}); use at most {smallest_share} or a larger batch")
    return m


def micro_batch_sizes(count, m):
    """A replica's `count` samples cut into m near-equal micro-batches (the first count % m one
    larger); every stage computes the same sizes, so message shapes need no handshake."""
    q, r = divmod(count, m)
    return [q + (1 if i < r else 0) for i in range(m)]


class StageStep:
    """One step of one pipeline stage over its GPT part (llmpi.model.gpt.GPT with blocks=(a, b)).

    `run(batches, sizes, global_batch)`: batches[i] = (x, y) of micro-batch i (the first stage
    reads x, the last y; others may pass None), sizes[i] its sample count. Adds into
    model.params.grad the gradient of sum_i sizes[i] / global_batch * mean loss of micro-batch i,
    returns the sum over micro-batches of size * mean loss (the last stage; 0 elsewhere).
    After it, `compute` holds this step's compute seconds (slowdown included), `channel.waiting`
    the seconds blocked on messages, `events` [(kind, micro_batch, start, end)] when recording.
    """

    def __init__(self, model, pipeline_comm, kind, slowdown=1.0, device_direct=False, clock=time.perf_counter):
        self.model, self.comm, self.kind, self.slowdown, self.clock = model, pipeline_comm, kind, slowdown, clock
        self.S, self.s = pipeline_comm.Get_size(), pipeline_comm.Get_rank()
        self.first, self.last = self.s == 0, self.s == self.S - 1
        self.channel = Channel(pipeline_comm, clock, device_direct)
        self.record = False
        self.events = []
        self.compute = 0.0
        self.peak_activation_bytes = 0  # measured from the caches in flight, when `measure_memory`
        self.measure_memory = False

    def run(self, batches, sizes, global_batch):
        m = len(sizes)
        actions = schedule(self.kind, self.S, self.s, m)
        self.compute, self.channel.waiting, self.events = 0.0, 0.0, []
        self._weights = self.model.weights.refresh()
        self._caches, self._pending = {}, {}
        loss_sum = 0.0
        self._post(actions, 0, batches, sizes)
        for k, (what, i) in enumerate(actions):
            self._post(actions, k + 1, batches, sizes)
            t0 = self._t_compute = self.clock()
            if what == "F":
                loss_sum += self._forward(i, batches[i], sizes[i])
            else:
                self._backward(i, sizes[i] / global_batch)
            self._account(what, i, t0)
        self.channel.wait_sends()
        return float(loss_sum)  # the GPU classifier's losses are device scalars: one read at the end

    def _post(self, actions, k, batches, sizes):
        """Post the receive that action k will wait for (one action ahead of its use)."""
        if k >= len(actions):
            return
        what, i = actions[k]
        if (what == "F" and self.first) or (what == "B" and self.last):
            return
        xp, C, T = self.model.xp, self.model.cfg.n_embd, self._seq_len(batches)
        buf = xp.empty((sizes[i], T, C), dtype=self.model.activation_dtype)  # (b, T, C)
        source, direction = (self.s - 1, FORWARD) if what == "F" else (self.s + 1, BACKWARD)
        self._pending[(what, i)] = self.channel.post_recv(buf, source, tag(i, direction))

    def _seq_len(self, batches):
        x = next((b[0] for b in batches if b is not None and b[0] is not None), None)
        return self.model.cfg.block_size if x is None else x.shape[1]

    def _receive(self, what, i):
        t0 = self.clock()
        buf = self.channel.wait(self._pending.pop((what, i)))
        self._t_compute = self.clock()  # the action's compute starts once its input is here
        if self.record:
            self.events.append(("wait", i, t0, self._t_compute))
        return buf

    def _forward(self, i, batch, size):
        model = self.model
        if self.first:
            x, c_emb = model.embedding.forward(batch[0])
        else:
            x, c_emb = self._receive("F", i), None
        x, c_blocks = model.blocks.forward(x, self._weights)
        loss = 0.0
        if self.last:
            _, loss, c_head = model.head.forward(x, model.weights.head, batch[1])
            loss *= size
        else:
            c_head = None
            self.channel.send(x, self.s + 1, tag(i, FORWARD))
        self._caches[i] = (c_emb, c_blocks, c_head)
        return loss

    def _backward(self, i, loss_scale):
        model = self.model
        c_emb, c_blocks, c_head = self._caches.pop(i)
        dx = model.head.backward(c_head, loss_scale) if self.last else self._receive("B", i)
        dx = model.blocks.backward(dx, c_blocks)
        if self.first:
            model.embedding.backward(dx, c_emb)
        else:
            self.channel.send(dx, self.s - 1, tag(i, BACKWARD))

    def _account(self, what, i, t0):
        """Compute time of the action (its waits excluded), the straggler sleep, the event."""
        start = self._t_compute
        busy = self.clock() - start
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * busy)
            busy *= self.slowdown
        self.compute += busy
        if self.measure_memory and what == "F":
            held = _bytes_held(self._caches, exclude=self._weights.values())  # the weights are no activations
            self.peak_activation_bytes = max(self.peak_activation_bytes, held)
        if self.record:
            self.events.append((what, i, start, self.clock()))


def _base(a):
    return a if a.base is None else a.base


def _bytes_held(caches, exclude=()):
    """Bytes of the distinct arrays (views counted through their base) the caches reference, but
    those whose base is one of `exclude`'s (the parameter buffers the caches point into)."""
    seen, total, stack = {id(_base(a)) for a in exclude}, 0, [caches]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "nbytes") and hasattr(item, "base"):
            base = _base(item)
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
    return total

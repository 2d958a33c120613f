"""The synchronous step with nothing on the host between its kernels (train.cuda_graph): each
micro-batch's forward and backward, and the clipped AdamW update, are each one function over
buffers that never move, replayed as CUDA graphs (llmpi.gpu.graph) on the GPU.

What changes against the eager step (llmpi.training.sync), and why:
- the batch is copied into one static (m, T) pair per micro-batch size m, which the graph reads;
- the losses add up on the device (loss x samples), read once per step after the last micro-batch;
- the clip's scale is computed on the device (clip_factor) and the update reads it, with lr and the
  bias corrections, from a small array (adamw_update_from), because a graph keeps kernel
  arguments as they were at capture; the gradient itself is left unscaled.
The all-reduce between the two runs outside the graphs, on the reducer as before.
`capture(key, fn)` runs fn: llmpi.gpu.graph.Graphs on the GPU, or `eager` (a plain call), with
which the CPU tests check this step against the eager one.
"""
from ..errors import UserError


def eager(key, fn):
    """A capture that runs fn as it is: the same step without graphs."""
    fn()


def check_job(job):
    """Refuse, naming the setting, a job whose step this module does not capture."""
    p, t = job.parallel, job.train
    if not t.cuda_graph:
        return
    refused = [(t.device == "cpu", "train.device = 'gpu'", "graphs are a CUDA feature"),
               (job.model.dtype != "bf16", "model.dtype = 'bf16'",
                "the float matmuls go through CuPy's cuBLAS calls, which refuse stream capture"),
               (p.mode != "sync", "parallel.mode = 'sync'", "the step it captures is the synchronous one"),
               (p.overlap, "parallel.overlap = false", "overlapped buckets start all-reduces mid-backward"),
               (p.zero != 0, "parallel.zero = 0", "the sharded update is not captured"),
               (p.pipeline > 1 or p.tensor > 1, "parallel.pipeline = 1 and parallel.tensor = 1",
                "model-parallel steps send messages between their kernels"),
               (job.optim.name != "adamw", "optim.name = 'adamw'", "only AdamW reads its step from the device")]
    for bad, needed, why in refused:
        if bad:
            raise UserError(f"train.cuda_graph = true needs {needed} ({why})")


class GraphedStep:
    """forward_backward(x, y) per micro-batch, loss_total() once, update(lr) once, per step."""

    def __init__(self, model, optimizer, batch_size, grad_clip, capture):
        self.model, self.optimizer, self.capture = model, optimizer, capture
        self.batch_size, self.grad_clip = batch_size, grad_clip
        xp, dtype = model.xp, model.params.dtype
        self.loss_sum = xp.zeros((), dtype=xp.float64)  # sum of loss x samples over this step's micro-batches
        self.hyper = xp.zeros(4, dtype=dtype)  # lr, 1 - beta1^t, 1 - beta2^t, the clip's scale
        self.inputs = {}  # micro-batch size -> its static (x, y)

    def forward_backward(self, x, y):
        """Add this micro-batch's gradient (scaled by its samples / B) into params.grad and its loss
        x samples into loss_sum; x, y (m, T) int64 of the model's module."""
        m = x.shape[0]
        if m not in self.inputs:
            self.inputs[m] = (x.copy(), y.copy())
        xs, ys = self.inputs[m]
        xs[...] = x
        ys[...] = y
        self.capture(("forward_backward", m), lambda: self._forward_backward(xs, ys, m))

    def _forward_backward(self, x, y, m):
        _, loss, cache = self.model.forward(x, y)
        self.loss_sum += loss * m
        self.model.backward(cache, loss_scale=m / self.batch_size)

    def loss_total(self):
        """This step's loss x samples as a float (the step's one wait for the device); resets it."""
        total = float(self.loss_sum)
        self.loss_sum.fill(0)
        return total

    def update(self, lr):
        """The clipped AdamW step on the (all-reduced) gradient."""
        self.hyper[...] = self.model.xp.asarray(self.optimizer.next_scalars(lr))
        self.capture(("update",), self._update)

    def _update(self):
        if self.grad_clip > 0:
            self.model.ops.clip_factor(self.model.params.grad, self.grad_clip, self.hyper[3:])
        self.optimizer.step_from(self.hyper)

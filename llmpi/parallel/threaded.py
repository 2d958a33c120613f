"""Intra-process data parallelism on the CPU: split the batch across threads.

NumPy's element-wise work (GELU, LayerNorm, softmax, AdamW) runs on one core however
many BLAS threads there are, so at 2+ threads a step is mostly serial. Instead,
`ThreadedGrad` splits a batch (B, T) along B into n contiguous chunks and runs
forward + backward of each chunk in its own thread, on a model replica that shares
the weights (`params.data`, no copy) but has its own flat gradient buffer. NumPy
releases the GIL inside matmul and large ufuncs, so the chunks really run in
parallel; BLAS is held to 1 thread per call meanwhile (the cores are already busy),
and restored afterwards. The replicas' gradients are then summed into the model's
gradient buffer: chunk b of B samples is backpropagated with loss_scale * b / B, so
the sum is the full-batch gradient (to rounding).

    tg = ThreadedGrad(model, n_threads=2)
    model.params.zero_grad()
    loss = tg.forward_backward(x, y)       # x, y (B, T); adds into model.params.grad
    clip_grad_norm(model.params.grad, 1.0)
    opt.step()

n_threads=1 is exactly `model.forward` + `model.backward`. There is no
on_block_done hook: the full gradient exists only after the final sum, so a caller
that overlaps communication with backward hands the whole buffer (or its buckets) to
the all-reduce after forward_backward returns.
"""
import contextlib
import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# (setter, getter) symbol names, by OpenBLAS build: scipy-openblas (NumPy >= 2 wheels), 64-bit int, plain
_OPENBLAS_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)
_BLAS_API = []  # memoized [(set, get)] or [None]


def _openblas_api():
    """(set_num_threads, get_num_threads) of the OpenBLAS loaded by NumPy, or None.

    Found like threadpoolctl: the shared objects mapped into this process
    (/proc/self/maps, Linux) whose name says openblas, opened again with ctypes
    (which returns the already-loaded copy) and asked for the setter symbol.
    """
    if _BLAS_API:
        return _BLAS_API[0]
    api = None
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        libs = []
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter, getter in _OPENBLAS_SYMBOLS:
            if hasattr(lib, setter) and hasattr(lib, getter):
                set_fn, get_fn = getattr(lib, setter), getattr(lib, getter)
                set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
                get_fn.argtypes, get_fn.restype = [], ctypes.c_int
                api = (set_fn, get_fn)
                break
        if api:
            break
    _BLAS_API.append(api)
    return api


@contextlib.contextmanager
def blas_threads(n):
    """Hold NumPy's OpenBLAS to n threads inside the block (process-wide), then restore.
    A no-op when the BLAS is not an OpenBLAS that can be found."""
    api = _openblas_api()
    if api is None:
        yield
        return
    set_fn, get_fn = api
    before = get_fn()
    if before != n:
        set_fn(n)
    try:
        yield
    finally:
        if before != n:
            set_fn(before)


def chunk_bounds(B, n):
    """[(lo, hi)] of min(n, B) contiguous, near-equal, non-empty chunks of range(B)."""
    k = max(1, min(n, B))
    edges = [B * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


class ThreadedGrad:
    """Forward + backward of one batch split along B over n_threads threads.

    `model` is a CPU llmpi.model.GPT; n_threads - 1 replicas are made with
    `model.replica()` (shared weights, own grad buffer: n_threads - 1 extra gradient
    buffers plus each thread's activations, which together equal one full batch's).
    The pool of n_threads - 1 worker threads is made once; the calling thread runs
    chunk 0 on `model` itself. Call `close()` (or use it as a context manager) to
    stop the workers.
    """

    def __init__(self, model, n_threads):
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if model.xp is not np:
            raise ValueError("ThreadedGrad is for the NumPy (CPU) model")
        self.model = model
        self.n_threads = int(n_threads)
        self.replicas = [model] + [model.replica() for _ in range(self.n_threads - 1)]
        self.pool = ThreadPoolExecutor(self.n_threads - 1, thread_name_prefix="llmpi-grad") \
            if self.n_threads > 1 else None

    def forward_backward(self, idx, targets, loss_scale=1.0):
        """idx, targets (B, T) int -> mean token loss of the batch (float).

        ADDS the gradient of loss_scale * mean token loss into model.params.grad, like
        model.backward (the caller zeroes it); the replicas' own buffers are scratch.
        """
        m = self.model
        if self.pool is None:
            _, loss, cache = m.forward(idx, targets)
            m.backward(cache, loss_scale)
            return loss
        B = idx.shape[0]
        bounds = chunk_bounds(B, self.n_threads)

        def run(i):
            lo, hi = bounds[i]
            rep = self.replicas[i]
            if i:
                rep.params.zero_grad()
            _, loss, cache = rep.forward(idx[lo:hi], targets[lo:hi])
            rep.backward(cache, loss_scale * (hi - lo) / B)
            return loss * (hi - lo)

        with blas_threads(1):
            futures = [self.pool.submit(run, i) for i in range(1, len(bounds))]
            total = run(0)
            total += sum(f.result() for f in futures)
            self._reduce(len(bounds))
        return total / B

    def _reduce(self, k):
        """model.params.grad += the grads of replicas 1..k-1, split by contiguous ranges over the threads."""
        if k < 2:
            return
        grads = [r.params.grad for r in self.replicas[:k]]
        n = grads[0].size
        parts = chunk_bounds(n, self.n_threads)

        def add(lo, hi):
            dst = grads[0][lo:hi]
            for g in grads[1:]:
                dst += g[lo:hi]

        futures = [self.pool.submit(add, lo, hi) for lo, hi in parts[1:]]
        add(*parts[0])
        for f in futures:
            f.result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

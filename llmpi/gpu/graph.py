"""CUDA graphs of the training step (train.cuda_graph, llmpi.training.graphed): each piece of
the step is captured once on a side stream and then replayed with one launch, so the hundreds
of kernel launches of a forward and backward cost no host time and leave no gaps between them.

The first call of a key runs the work eagerly: it compiles the kernels (NVRTC), makes the
buffers layers create on first use and the library handles, none of which a capture may do.
The second call captures it (CuPy stream capture, relaxed mode) and launches the graph; later
calls only launch it, on the current stream, so it stays ordered after the copies of its inputs.

What a captured function allocates comes from a memory pool of its own and is left there when
the capture ends: a graph writes those addresses again at every replay, so no other array may
ever get them. Whatever must outlive a replay (its inputs, its outputs, the parameters) is
allocated before the capture and written in place.
"""
import numpy as np

from ..errors import UserError


def graphs_for(xp):
    """Graphs for a run on arrays of module xp (CuPy); a CPU run (device auto without a GPU) cannot take them."""
    if xp is np:
        raise UserError("train.cuda_graph = true captures the step in CUDA graphs: it needs train.device = 'gpu'")
    return Graphs()


class Graphs:
    """graphs(key, fn): run fn (no arguments) as the CUDA graph captured for `key`."""

    def __init__(self):
        import cupy
        self._cupy = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)  # capture needs a stream other than the legacy one
        self.pool = cupy.cuda.MemoryPool()
        self.graphs, self._warmed = {}, set()
        self._check_sort_capturable()

    def _check_sort_capturable(self):
        """The embedding's deterministic backward sorts (cupy.sort, Thrust), and CuPy before its pull
        request 9497 ends every sort with a stream synchronize (cupy issue 9126), which a capture
        forbids: refuse such a CuPy here, in one line, instead of failing in the first capture."""
        cupy = self._cupy
        keys = cupy.arange(8, dtype=cupy.int64)[::-1].copy()
        cupy.sort(keys)  # eagerly first, as every key of __call__
        try:
            self._capture(lambda: cupy.sort(keys))
        except Exception as err:
            raise UserError(f"train.cuda_graph = true: CuPy {cupy.__version__} cannot capture a sort (its Thrust sort "
                            "synchronizes the stream: cupy issue 9126, fixed by cupy pull request 9497); install a "
                            f"CuPy with that fix or run without train.cuda_graph ({type(err).__name__})") from None

    def __call__(self, key, fn):
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self._warmed:
                self._warmed.add(key)
                fn()
                return
            graph = self.graphs[key] = self._capture(fn)
        graph.launch()

    def _capture(self, fn):
        cupy = self._cupy
        with self.stream, cupy.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                fn()
            except BaseException:
                try:
                    self.stream.end_capture()
                except Exception:  # the capture is invalid after the error; the error above is the one to see
                    pass
                raise
            return self.stream.end_capture()

"""Measure on each rank what the pipeline planner (llmpi.parallel.partition) takes as input.

What is measured, and what is modelled instead:
- compute: forward + backward of one micro-batch (b sequences of block_size tokens, random
  tokens) through the embedding, one transformer block and the head, by the model's own stages
  (llmpi.model.stages via a one-block llmpi.model.gpt.GPT of the same config), `repeats` runs
  after a warm-up, the median, times this rank's --slowdown factor. The L blocks of a GPT have
  the same shapes, so one block's time stands for each of them.
- memory, counted, not measured: a block's parameter bytes from its layout; the bytes a stage
  holds per parameter byte (state_factor) from the buffers of a one-block stage and its optimizer
  (params, grads and the arrays of the optimizer's state_dict: 4 for AdamW's m and v, 3 for SGD's
  momentum, as the runtime's start check counts; the weight-decay mask is not counted); the
  activations kept per micro-batch: llmpi.model.gpt.block_activation_bytes per block, and
  (2C + 2 + V) x itemsize per token for the head (GPT.activation_bytes_per_token's docstring).
- sync_rate, seconds per parameter byte: the optimizer step on one block's buffer, plus, with
  D > 1 replicas, an MPI_Allreduce of a buffer of that size (host memory, standing in for the
  job's algorithm) on the ranks that would share a stage on the default grid (rank % S).
- send_time: an MPI Sendrecv of one micro-batch's (b, T, C) activation with the neighbouring
  rank (rank ^ 1), both directions at once as the activation goes forward and its gradient
  back; one number for the job, the slowest pair's. tied_time (summing the two wte copies'
  gradients) is modelled from it: the same seconds per byte times wte's bytes.
`profile` is collective on `comm` and returns the same Profile on every rank (allgather);
Profile.costs() turns it into the planner's input.
"""
import dataclasses
import time

import numpy as np

from .. import backend
from ..model.gpt import DTYPES, GPT, block_activation_bytes, head_activation_bytes
from ..model.params import FlatParams
from ..model.stages import block_layout, embedding_layout, head_layout
from .partition import PipelineCosts


@dataclasses.dataclass
class RankProfile:
    block_time: float  # seconds: forward + backward of one micro-batch through one block (x slowdown)
    embedding_time: float  # seconds, the embedding's (x slowdown)
    head_time: float  # seconds, ln_f + LM head + loss (x slowdown)
    optimizer_rate: float  # seconds per parameter byte of the optimizer step
    allreduce_rate: float  # seconds per parameter byte of the data-parallel all-reduce (0: D = 1)
    send_time: float  # seconds of one activation's Sendrecv with the neighbour (0: none)
    slowdown: float  # the factor applied to the compute times
    state_factor: float  # bytes held per parameter byte by a stage and its optimizer


@dataclasses.dataclass
class ModelSizes:
    block_param_bytes: float  # one block's parameters
    embedding_param_bytes: float  # wte + wpe
    head_param_bytes: float  # ln_f
    tied_param_bytes: float  # the wte copy of the last stage
    block_activation_bytes: float  # kept for backward by one block, per micro-batch
    head_activation_bytes: float  # kept by the head, per micro-batch
    send_bytes: float  # one micro-batch's activation (b, T, C)


@dataclasses.dataclass
class Profile:
    ranks: list  # a RankProfile per rank of the communicator
    sizes: ModelSizes
    n_layer: int

    def costs(self):
        """The planner's PipelineCosts: every block costs the measured block time; the send is
        the slowest pair's, and the tied wte sum moves wte's bytes at the send's rate."""
        p, z = self.ranks, self.sizes
        send = max(r.send_time for r in p)
        return PipelineCosts(
            block_time=[[r.block_time] * self.n_layer for r in p], embedding_time=[r.embedding_time for r in p],
            head_time=[r.head_time for r in p], block_param_bytes=z.block_param_bytes,
            embedding_param_bytes=z.embedding_param_bytes, head_param_bytes=z.head_param_bytes,
            tied_param_bytes=z.tied_param_bytes, block_activation_bytes=z.block_activation_bytes,
            head_activation_bytes=z.head_activation_bytes, send_time=send,
            sync_rate=[r.optimizer_rate + r.allreduce_rate for r in p],
            tied_time=send / z.send_bytes * z.tied_param_bytes, state_factor=max(r.state_factor for r in p))


def model_sizes(cfg, micro_batch):
    """The ModelSizes of a ModelConfig for micro-batches of `micro_batch` sequences."""
    itemsize = np.dtype(DTYPES[cfg.dtype]).itemsize
    tokens = micro_batch * cfg.block_size

    def nbytes(layout):
        return float(sum(int(np.prod(shape)) for _, shape in layout) * itemsize)

    return ModelSizes(
        block_param_bytes=nbytes(block_layout(cfg, 0)), embedding_param_bytes=nbytes(embedding_layout(cfg)),
        head_param_bytes=nbytes(head_layout(cfg)), tied_param_bytes=nbytes(embedding_layout(cfg)[:1]),
        block_activation_bytes=float(block_activation_bytes(cfg) * tokens),
        head_activation_bytes=float(head_activation_bytes(cfg) * tokens),
        send_bytes=float(cfg.n_embd * itemsize * tokens))


def _median_seconds(fn, repeats, before=lambda: None, after=lambda: None):
    """Median wall seconds of fn() over `repeats` runs after one warm-up (first-touch allocations,
    kernel compilation); before() runs outside the clock, after() inside (e.g. a GPU sync)."""
    fn()
    after()
    times = []
    for _ in range(repeats):
        before()
        t0 = time.perf_counter()
        fn()
        after()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_compute(model, micro_batch, make_optimizer, repeats=3, slowdown=1.0, seed=0):
    """((embedding, block, head) seconds x slowdown, optimizer seconds per parameter byte, state
    factor) on this rank; `model` is a one-block GPT, make_optimizer(params, ops) the job's optimizer."""
    cfg, xp = model.cfg, model.xp
    sync = lambda: backend.synchronize(model.params.data)  # noqa: E731  (GPU work is asynchronous)
    rng = np.random.default_rng(seed)
    idx, targets = (xp.asarray(rng.integers(0, cfg.vocab_size, (micro_batch, cfg.block_size))) for _ in "it")
    matrices = model.weights.refresh()
    x, _ = model.embedding.forward(idx)  # (B, T, C)
    grad = xp.full_like(x, 1e-3)  # (B, T, C) a stand-in for the gradient from the next stage

    def embedding():
        _, cache = model.embedding.forward(idx)
        model.embedding.backward(grad, cache)

    def block():  # forward leaves x intact (residual.forward adds into fresh buffers); backward adds into its dx
        _, caches = model.blocks.forward(x, matrices)
        model.blocks.backward(grad.copy(), caches)

    def head():
        _, _, cache = model.head.forward(x, model.weights.head, targets)
        model.head.backward(cache)

    times = [slowdown * _median_seconds(fn, repeats, after=sync) for fn in (embedding, block, head)]
    params = FlatParams(block_layout(cfg, 0), xp, DTYPES[cfg.dtype])
    optimizer = make_optimizer(params, model.ops)
    state = [a for a in optimizer.state_dict().values() if getattr(a, "shape", None) == params.data.shape]
    held = params.data.nbytes + params.grad.nbytes + sum(a.nbytes for a in state)
    rate = _median_seconds(optimizer.step, repeats, after=sync) / params.data.nbytes
    return times, rate, held / params.data.nbytes


def measure_comm(comm, sizes, dtype, S, repeats=3):
    """(all-reduce seconds per byte on this rank's data group of the default grid, Sendrecv seconds
    of one activation with rank ^ 1), each 0 without a partner. Collective on `comm`."""
    from mpi4py import MPI
    rank, world = comm.Get_rank(), comm.Get_size()
    data = comm.Split(rank % S, rank)
    buf = np.zeros(int(sizes.block_param_bytes) // np.dtype(dtype).itemsize, dtype)
    seconds = _median_seconds(lambda: data.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), repeats, data.Barrier)
    allreduce_rate = seconds / buf.nbytes if data.Get_size() > 1 else 0.0
    data.Free()
    out = np.zeros(int(sizes.send_bytes) // np.dtype(dtype).itemsize, dtype)
    back, partner = np.empty_like(out), rank ^ 1
    exchange = (lambda: comm.Sendrecv(out, partner, 0, back, partner, 0)) if partner < world else (lambda: None)
    seconds = _median_seconds(exchange, repeats, comm.Barrier)  # every rank joins the barriers
    return allreduce_rate, seconds if partner < world else 0.0


def profile(comm, cfg, micro_batch, S, make_optimizer, xp=np, repeats=3, slowdown=1.0, seed=0):
    """The Profile of every rank of `comm` (the same on every rank); collective. cfg: the job's
    ModelConfig (vocab_size set), S the pipeline stages, make_optimizer(params, ops)."""
    one = GPT(dataclasses.replace(cfg, n_layer=1), xp=xp, seed=seed)
    sizes = model_sizes(cfg, micro_batch)
    times, rate, factor = measure_compute(one, micro_batch, make_optimizer, repeats, slowdown, seed)
    allreduce_rate, send_time = measure_comm(comm, sizes, one.params.dtype, S, repeats)
    mine = RankProfile(times[1], times[0], times[2], rate, allreduce_rate, send_time, float(slowdown), factor)
    return Profile(comm.allgather(mine), sizes, cfg.n_layer)

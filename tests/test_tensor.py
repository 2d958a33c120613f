"""Tensor parallelism and the ZeRO-1 optimizer against the single-process model on the same samples.

Each grid runs inside one MPI job on sub-communicators (K=4 on the 4 ranks, 2x1x2, 1x2x2, ...)
with a tiny float64 model whose vocabulary (23) does not divide K, so the vocab-parallel padding
is exercised: the loss and every gradient, reassembled from the shards by name, equal the whole
model's to 1e-10 relative (only the order of the additions differs: the partial products of the
row-parallel layers are summed in the group, the micro-batches and replicas in another order).
Under plain pytest only the one-rank cases run; `mpiexec -n 4 python -m pytest --with-mpi` runs all.
"""
import numpy as np
import pytest
from mpi4py import MPI

from conftest import rel_error
from llmpi.comm.allreduce import allreduce_sum
from llmpi.comm.p2p import exchange_add
from llmpi.comm.world import world
from llmpi.config import ModelConfig, OptimConfig
from llmpi.model.params import FlatParams
from llmpi.model.gpt import GPT, gpt2_layout
from llmpi.parallel.allocate import even_split
from llmpi.parallel.grid import make_grid
from llmpi.parallel.pipeline import StageStep, micro_batch_sizes
from llmpi.parallel.tensor import TensorGroup, replicated, shard, shard_shape, unshard
from llmpi.parallel.zero import ShardedOptimizer
from llmpi.training.optim import make_optimizer
from llmpi.training.pipeline import stage_bounds
from mpi_helpers import agreed, first_ranks

CFG = dict(vocab_size=23, block_size=8, n_head=4, n_embd=16, dtype="float64")
B = 12


def grid_step(comm, D, S, K, n_layer=2, m=2, seed=5, recompute="none"):
    """One step of the D x S x K grid on `comm`: (loss, {name: whole gradient}, reference model,
    whether every shard holds the same gradient of each replicated parameter); the whole
    gradients are reassembled on every rank (collective). recompute: the grid's model.recompute
    (the reference keeps everything)."""
    ref = GPT(ModelConfig(n_layer=n_layer, **CFG), seed=seed)
    cfg = ModelConfig(n_layer=n_layer, recompute=recompute, **CFG)
    x, y = np.random.default_rng(seed).integers(0, CFG["vocab_size"], (2, B, CFG["block_size"]))
    _, ref_loss, cache = ref.forward(x, y)
    ref.backward(cache)
    grid = make_grid(comm, S, K=K)
    group = TensorGroup(grid.tensor)
    part = GPT(cfg, seed=seed + 1, blocks=stage_bounds("uniform", n_layer, S)[grid.stage], tensor=group)
    for name in part.params.names:  # this rank's shards of the reference weights (seed + 1 above proves the copy)
        part.params.views[name][...] = group.shard(name, ref.params.views[name])
    shares = even_split(grid.D, B)
    lo = sum(shares[:grid.replica])
    sizes = micro_batch_sizes(shares[grid.replica], m)
    edges = lo + np.concatenate([[0], np.cumsum(sizes)])
    batches = [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    loss_sum = StageStep(part, grid.pipeline, "1f1b").run(batches, sizes, B)
    if S > 1 and (grid.first or grid.last):
        exchange_add(part.params.grad_views["wte"], S - 1 - grid.stage, grid.pipeline)
    allreduce_sum(part.params.grad, grid.data)
    total = np.array([loss_sum if grid.shard == 0 else 0.0])
    comm.Allreduce(MPI.IN_PLACE, total)
    grads, same = {}, True
    for name in part.params.names:
        pieces = grid.tensor.allgather(part.params.grad_views[name].copy())
        if replicated(name):  # every shard computed the same gradient (a flag: a raise here would hang the others)
            same &= all(np.array_equal(p, pieces[0]) for p in pieces)
        grads[name] = unshard(name, pieces, ref.params.views[name].shape)
    grid.free()
    return float(total[0]) / B, ref_loss, grads, ref, same


GRIDS = [(1, 1, 1), (1, 1, 2), (1, 1, 4), (2, 1, 2), (1, 2, 2)]  # D, S, K


@pytest.mark.parametrize("D,S,K", GRIDS, ids=[f"{d}x{s}x{k}" for d, s, k in GRIDS])
def test_tensor_parallel_equals_the_single_process_model_in_float64(D, S, K):
    check_grid_against_the_whole_model(D, S, K)


@pytest.mark.parametrize("D,S,K,recompute", [(1, 1, 1, "gelu+ln"), (1, 2, 2, "gelu"), (1, 2, 2, "gelu+ln")],
                         ids=["1x1x1-gelu+ln", "1x2x2-gelu", "1x2x2-gelu+ln"])
def test_recompute_on_stages_and_shards(D, S, K, recompute):
    """model.recompute on pipeline stages of tensor shards (the row-parallel c_proj keeps no GELU
    output, the column-parallel c_attn and c_fc no LayerNorm output): the gradients of the whole
    model that keeps them."""
    check_grid_against_the_whole_model(D, S, K, recompute=recompute)


def check_grid_against_the_whole_model(D, S, K, recompute="none"):
    comm = world()
    if D * S * K > comm.Get_size():
        pytest.skip(f"needs {D * S * K} ranks (mpiexec -n 4 python -m pytest --with-mpi)")
    sub = first_ranks(comm, D * S * K)
    ok = True
    if sub != MPI.COMM_NULL:
        loss, ref_loss, grads, ref, ok = grid_step(sub, D, S, K, recompute=recompute)
        ok &= abs(loss - ref_loss) <= 1e-10 * ref_loss
        for name, g in grads.items():  # each stage reassembles its own names
            ok &= g.shape == ref.params.views[name].shape
            ok &= rel_error(g, ref.params.grad_views[name]) <= 1e-10
        sub.Free()
    assert agreed(ok, comm)


def test_the_same_seed_gives_the_shards_of_the_same_weights():
    """A tensor-parallel model initialises as the shards of the whole one (checkpoints and resumes
    across K rely on it); run on a one-rank group that pretends to be shard 1 of 2."""
    cfg = ModelConfig(n_layer=2, **CFG)
    whole = GPT(cfg, seed=3)

    class Pretend(TensorGroup):
        def __init__(self):
            self.k, self.K, self.bytes = 1, 2, 0

    part = GPT(cfg, seed=3, tensor=Pretend())
    for name in part.params.names:
        np.testing.assert_array_equal(part.params.views[name], shard(name, whole.params.views[name], 1, 2))


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_shards_join_back_into_the_whole_tensor(K):
    cfg = ModelConfig(n_layer=1, vocab_size=23, block_size=8, n_head=12, n_embd=24, dtype="float64")
    rng = np.random.default_rng(K)
    for name, shape in gpt2_layout(cfg):
        full = rng.standard_normal(shape)
        pieces = [shard(name, full, k, K) for k in range(K)]
        assert all(p.shape == shard_shape(name, shape, K) for p in pieces)
        np.testing.assert_array_equal(unshard(name, pieces, shape), full)
        if name.endswith("c_attn.weight") and K > 1:  # whole heads of q, of k and of v on each shard
            q = full[:, :24]
            np.testing.assert_array_equal(pieces[0][:, :24 // K], q[:, :24 // K])


def _plain_and_sharded(comm, algorithm, steps=4, clip=0.5):
    """AdamW on D replicas: the plain one (all-reduce, then the whole step) and ZeRO-1 (reduce-
    scatter, the slice's step, all-gather); each rank adds a different gradient every step."""
    layout = [("a.weight", (7, 5)), ("a.bias", (5,)), ("b.weight", (11,))]  # odd sizes: uneven slices
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    rank = comm.Get_rank()
    plain, zero = FlatParams(layout, np, np.float64), FlatParams(layout, np, np.float64)
    start = np.random.default_rng(0).standard_normal(plain.size)
    plain.data[...] = start
    zero.data[...] = start
    opt_plain = make_optimizer(cfg, plain)
    opt_zero = ShardedOptimizer(zero, lambda part: make_optimizer(cfg, part), comm, algorithm)
    for step in range(steps):
        g = np.random.default_rng(100 * step + rank).standard_normal(plain.size)
        plain.grad[...] = g
        zero.grad[...] = g
        allreduce_sum(plain.grad, comm)
        norm = float(np.sqrt(np.sum(plain.grad ** 2)))
        plain.grad *= min(1.0, clip / norm)
        opt_plain.step()
        opt_zero.reduce(zero.grad)
        sumsq = np.array([float(np.sum(opt_zero.slice.grad ** 2))])
        comm.Allreduce(MPI.IN_PLACE, sumsq)
        opt_zero.clip(lambda g, max_norm, norm: g.__imul__(min(1.0, max_norm / norm)), clip, float(np.sqrt(sumsq[0])))
        opt_zero.step()
    return plain, opt_plain, zero, opt_zero


@pytest.mark.parametrize("algorithm", ["mpi", "ring"], ids=["reduce_scatter", "ring_halves"])  # an id "mpi" reads as the mpi mark
def test_zero1_gives_the_parameters_of_the_plain_optimizer(algorithm):
    comm = world()
    ok = True
    for p in sorted({1, 2, comm.Get_size()}):
        if p > comm.Get_size():
            continue
        sub = first_ranks(comm, p)
        if sub != MPI.COMM_NULL:
            plain, opt_plain, zero, opt_zero = _plain_and_sharded(sub, algorithm)
            ok &= rel_error(zero.data, plain.data) <= 1e-12  # float64; only the summation order differs
            everyone = sub.allgather(zero.data.copy())
            ok &= all(np.array_equal(d, everyone[0]) for d in everyone)  # bitwise across replicas
            state = opt_zero.state_dict()  # collective: the whole moments on the group's rank 0
            if sub.Get_rank() == 0:
                whole = opt_plain.state_dict()
                ok &= state["step"] == whole["step"]
                ok &= all(rel_error(state[k], whole[k]) <= 1e-12 for k in whole if k != "step")
                opt_zero.load_state_dict(state)
            plain_bytes = sum(v.nbytes for k, v in opt_plain.state_dict().items() if k != "step")
            ok &= opt_zero.state_bytes() <= plain_bytes / p + 2 * 8  # m and v of 1/D of the buffer (+1 element)
            sub.Free()
        ok = agreed(ok, comm)
    assert ok

"""Pipeline parallelism against the single-process model on the same samples.

Every layout runs inside one MPI job on sub-communicators (S=3 on 3 of the 4 ranks, grids 2x2,
...), with a tiny float64 model: the loss and each stage's gradient (tied wte summed, each
stage's buffer all-reduced over its replicas) equal the whole model's in float64, to 1e-10
relative (only the order of the additions differs: micro-batches, the tied sum). Under plain
pytest only the one-rank layouts run; `mpiexec -n 4 python -m pytest --with-mpi` runs them all.
"""
import numpy as np
import pytest
from mpi4py import MPI

from conftest import rel_error
from llmpi.comm.allreduce import allreduce_sum
from llmpi.comm.p2p import exchange_add
from llmpi.comm.world import world
from llmpi.config import ModelConfig
from llmpi.errors import UserError
from llmpi.model.gpt import GPT
from llmpi.parallel.allocate import even_split
from llmpi.parallel.grid import check_shape, make_grid
from llmpi.parallel.pipeline import StageStep, micro_batch_sizes, peak_in_flight, schedule
from llmpi.training.pipeline import stage_bounds
from mpi_helpers import agreed, first_ranks

CFG = dict(vocab_size=23, block_size=8, n_head=2, n_embd=16, dtype="float64")
B = 12  # the global batch


def reference(n_layer, seed=5):
    """The whole model's loss and gradient by name on one global batch (every rank alike)."""
    model = GPT(ModelConfig(n_layer=n_layer, **CFG), seed=seed)
    x, y = np.random.default_rng(seed).integers(0, CFG["vocab_size"], (2, B, CFG["block_size"]))
    _, loss, cache = model.forward(x, y)
    model.backward(cache)
    return model, loss, x, y


def pipeline_step(comm, S, n_layer, partition, m, kind, seed=5, n_embd=None):
    """One step of the D x S grid on `comm`: (loss, {name: gradient}, the reference model)."""
    cfg = dict(CFG, n_embd=n_embd or CFG["n_embd"])
    ref = GPT(ModelConfig(n_layer=n_layer, **cfg), seed=seed)
    x, y = np.random.default_rng(seed).integers(0, cfg["vocab_size"], (2, B, cfg["block_size"]))
    _, ref_loss, cache = ref.forward(x, y)
    ref.backward(cache)
    grid = make_grid(comm, S)
    bounds = stage_bounds(partition, n_layer, S)
    part = GPT(ModelConfig(n_layer=n_layer, **cfg), seed=seed + 1, blocks=bounds[grid.stage])
    for name in part.params.names:  # the same weights, by name (a different seed above proves the copy)
        part.params.views[name][...] = ref.params.views[name]
    shares = even_split(grid.D, B)
    lo = sum(shares[:grid.replica])
    sizes = micro_batch_sizes(shares[grid.replica], m)
    edges = lo + np.concatenate([[0], np.cumsum(sizes)])
    batches = [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    loss_sum = StageStep(part, grid.pipeline, kind).run(batches, sizes, B)
    if S > 1 and (grid.first or grid.last):
        exchange_add(part.params.grad_views["wte"], S - 1 - grid.stage, grid.pipeline)
    allreduce_sum(part.params.grad, grid.data)
    total = np.array([loss_sum])
    comm.Allreduce(MPI.IN_PLACE, total)
    grads = {n: part.params.grad_views[n].copy() for n in part.params.names}
    grid.free()
    return float(total[0]) / B, ref_loss, grads, ref


LAYOUTS = [  # (D, S, n_layer, partition, micro-batches, schedule)
    (1, 1, 2, "uniform", 3, "1f1b"),
    (1, 2, 3, "uniform", 1, "1f1b"), (1, 2, 3, "uniform", 4, "gpipe"), (1, 2, 2, "uniform", 3, "1f1b"),
    (1, 3, 5, "1,3,1", 3, "1f1b"), (1, 3, 5, "1,3,1", 4, "gpipe"), (1, 3, 3, "uniform", 1, "gpipe"),
    (1, 4, 4, "uniform", 4, "1f1b"), (1, 4, 5, "2,1,1,1", 3, "gpipe"),
    (2, 2, 3, "2,1", 3, "1f1b"), (2, 2, 2, "uniform", 1, "gpipe"), (4, 1, 2, "uniform", 2, "1f1b"),
    (2, 1, 2, "uniform", 3, "gpipe"),
]


@pytest.mark.parametrize("D,S,n_layer,partition,m,kind", LAYOUTS,
                         ids=[f"{d}x{s}-L{n}-{p}-m{m}-{k}" for d, s, n, p, m, k in LAYOUTS])
def test_layout_equals_the_single_process_model_in_float64(D, S, n_layer, partition, m, kind):
    comm = world()
    size = D * S
    if size > comm.Get_size():
        pytest.skip(f"needs {size} ranks (mpiexec -n 4 python -m pytest --with-mpi)")
    sub = first_ranks(comm, size)
    ok = True
    if sub != MPI.COMM_NULL:
        loss, ref_loss, grads, ref = pipeline_step(sub, S, n_layer, partition, m, kind)
        ok = abs(loss - ref_loss) <= 1e-10 * ref_loss
        for name, g in grads.items():
            ok &= rel_error(g, ref.params.grad_views[name]) <= 1e-10
        sub.Free()
    assert agreed(ok, comm)


def test_a_stage_message_beyond_the_eager_limit():
    """Activations of 2 x 64 x 256 float64 = 256 KiB per message: two neighbours that both sent
    with a blocking Send would deadlock in MPICH; the non-blocking channel does not."""
    comm = world()
    if comm.Get_size() < 2:
        pytest.skip("needs 2 ranks")
    sub = first_ranks(comm, 2)
    ok = True
    if sub != MPI.COMM_NULL:
        global CFG
        saved = CFG
        CFG = dict(CFG, block_size=64)
        try:
            loss, ref_loss, grads, ref = pipeline_step(sub, 2, 2, "uniform", 6, "1f1b", n_embd=256)
        finally:
            CFG = saved
        ok = abs(loss - ref_loss) <= 1e-10 * ref_loss
        ok &= all(rel_error(g, ref.params.grad_views[n]) <= 1e-10 for n, g in grads.items())
        sub.Free()
    assert agreed(ok, comm)


@pytest.mark.parametrize("S,m", [(1, 1), (2, 1), (2, 5), (3, 4), (4, 8), (4, 2)])
def test_schedules_run_every_micro_batch_once_in_dependency_order(S, m):
    for kind in ("1f1b", "gpipe"):
        for s in range(S):
            actions = schedule(kind, S, s, m)
            assert sorted(actions) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
            assert all(actions.index(("F", i)) < actions.index(("B", i)) for i in range(m))
            assert [i for w, i in actions if w == "B"] == list(range(m))  # same gradient order in both
            held = peak = 0
            for what, _ in actions:
                held += 1 if what == "F" else -1
                peak = max(peak, held)
            assert peak == peak_in_flight(kind, S, s, m)
    assert peak_in_flight("1f1b", 4, 0, 8) == 4 and peak_in_flight("gpipe", 4, 0, 8) == 8


def test_partitions_and_shapes_are_checked():
    assert stage_bounds("uniform", 5, 2) == [(0, 3), (3, 5)]
    assert stage_bounds("1,3,1", 5, 3) == [(0, 1), (1, 4), (4, 5)]
    for bad in ("1,3", "0,4,1", "1,3,2", "two"):
        with pytest.raises(UserError, match="partition"):
            stage_bounds(bad, 5, 3)
    assert check_shape(4, 2, 4) == 2
    with pytest.raises(UserError, match="does not divide"):
        check_shape(4, 3, 6)
    with pytest.raises(UserError, match="exceed the 2 blocks"):
        check_shape(4, 4, 2)
    assert micro_batch_sizes(7, 3) == [3, 2, 2] and micro_batch_sizes(3, 3) == [1, 1, 1]


def test_a_stage_holds_only_its_names_and_starts_like_the_whole_model():
    cfg = ModelConfig(n_layer=3, **CFG)
    whole = GPT(cfg, seed=9)
    first, middle, last = (GPT(cfg, seed=9, blocks=b) for b in ((0, 1), (1, 2), (2, 3)))
    assert first.params.names[:2] == ["wte", "wpe"] and "ln_f.weight" not in first.params.names
    assert all(n.startswith("h.1.") for n in middle.params.names)
    assert last.params.names[-1] == "wte" and "wpe" not in last.params.names
    for part in (first, middle, last):
        for name in part.params.names:
            assert np.array_equal(part.params.views[name], whole.params.views[name]), name
    assert sum(p.params.size for p in (first, middle, last)) == whole.params.size + whole.params.views["wte"].size
    with pytest.raises(ValueError, match="runs the whole model"):
        middle.forward(np.zeros((1, 4), np.int64))

"""parallel.async_rule: the staleness and DC-ASGD formulas on a scripted interleaving, each rule at
one rank against synchronous SGD, and every rule (and every mode) ending at world sizes 1..4
inside one MPI run and at 8 ranks (oversubscribed) as a user runs it."""
import os
import types

import numpy as np
import pytest
from mpi4py import MPI

from cli import single_process_only
from llmpi import config, data
from llmpi.training import LOOPS, metrics
from llmpi.training.async_rma import compensate, staleness_factor
from llmpi.training.run import Run
from mpi_helpers import agreed, subcomms
from test_train import corpus, steps, train  # noqa: F401  (corpus is a fixture)

COMM = MPI.COMM_WORLD


def scripted_two_workers(rule, lam=0.5, lr=0.1):
    """f(w) = sum(a w^2 / 2), SGD pushes. A and B both pull w0 (version 0); B pushes first
    (ticket 0, staleness 0), then A (ticket 1, staleness 1): the order the windows would see."""
    a, w0 = np.array([1.0, 3.0]), np.array([1.0, -2.0])
    grad_b, grad_a = a * w0, a * w0  # both computed at the pulled w0
    w = w0 - lr * staleness_factor(rule, 0) * grad_b
    if rule == "dc":
        compensate(grad_a, w, w0, lam)  # A reads w (B's push landed) before its push
    return w - lr * staleness_factor(rule, 1) * grad_a


def test_the_rules_on_a_scripted_interleaving():
    # by hand: g = [1, -6]; after B, w1 = [0.9, -1.4]
    np.testing.assert_allclose(scripted_two_workers("plain"), [0.8, -0.8])
    np.testing.assert_allclose(scripted_two_workers("staleness"), [0.85, -1.1])  # A's push halved
    # A's gradient + 0.5 * g * g * (w1 - w0) = [1 - 0.05, -6 + 10.8]
    np.testing.assert_allclose(scripted_two_workers("dc"), [0.805, -1.88])
    assert [staleness_factor(r, 3) for r in ("plain", "staleness", "dc")] == [1.0, 0.25, 1.0]


def test_compensation_without_drift_leaves_the_gradient_bitwise():
    g = np.random.default_rng(0).standard_normal(5).astype(np.float32)
    w = np.random.default_rng(1).standard_normal(5).astype(np.float32)
    assert compensate(g.copy(), w, w.copy(), 0.04).tobytes() == g.tobytes()


SGD = ["--set", "optim.name=sgd", "--set", "optim.momentum=0", "--set", "optim.weight_decay=0",
       "--set", "optim.lr=0.5", "--set", "train.eval_interval=0"]


@single_process_only
def test_every_rule_at_one_rank_is_sgd_step_for_step(tmp_path, corpus):  # noqa: F811
    train(tmp_path, corpus, *SGD, name="sync")
    for rule in ("plain", "staleness", "dc"):
        train(tmp_path, corpus, *SGD, "--set", "parallel.mode=async", "--set", f"parallel.async_rule={rule}",
              name=rule)
    np.testing.assert_allclose(steps(tmp_path, "sync")["loss"], steps(tmp_path, "plain")["loss"], rtol=1e-6)
    for rule in ("staleness", "dc"):  # staleness 0 and no drift: the very same pushes as plain
        s = steps(tmp_path, rule)
        assert s["loss"].tobytes() == steps(tmp_path, "plain")["loss"].tobytes(), rule
        assert (s["staleness"] == 0).all()
    n = steps(tmp_path, "dc")["comm_bytes"] / steps(tmp_path, "plain")["comm_bytes"]
    np.testing.assert_array_equal(n, 1.5)  # dc reads the vector once more: 3 vectors a push, not 2


@single_process_only
def test_async_dc_and_staleness_end_at_8_ranks(tmp_path, corpus):  # noqa: F811
    """Oversubscribed (8 ranks on the test machine's cores): every push of the budget lands."""
    for rule in ("staleness", "dc"):
        train(tmp_path, corpus, "--set", "parallel.mode=async", "--set", f"parallel.async_rule={rule}",
              "--set", "train.max_iters=4", np=8, name=rule, timeout=120)
        assert len(steps(tmp_path, rule)["step"]) == 4 * 8


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rules")) if COMM.rank == 0 else None
    path = COMM.bcast(path, root=0)
    if COMM.rank == 0:
        data.prepare([data.tokenfile.__file__, config.__file__], "byte", 0.1, f"{path}/c.h5", progress=False)
    COMM.Barrier()
    return path


@pytest.mark.parametrize("mode,extra", [
    ("sync", []), ("async", ["parallel.async_rule=plain"]), ("async", ["parallel.async_rule=staleness"]),
    ("async", ["parallel.async_rule=dc"]), ("local", ["parallel.local_steps=4"]),
    ("local", ["parallel.local_steps=2", "parallel.outer_lr=0.7", "parallel.outer_momentum=0.9"]),
], ids=["sync", "async-plain", "async-staleness", "async-dc", "local", "local-outer"])
def test_every_mode_ends_at_every_world_size(shared_dir, mode, extra):
    """1..world ranks of this MPI run (sub-communicators); the ranks outside wait at the next split."""
    for P, sub in subcomms(COMM):
        ok = True
        if sub != MPI.COMM_NULL:
            name = f"{mode}-{'-'.join(extra)}-{P}"
            job = config.load_job(None, [
                "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16",
                "train.batch_size=6", "train.max_iters=6", "train.log_interval=100", "train.eval_interval=3",
                "train.eval_iters=1", f"data.path={shared_dir}/c.h5", f"train.out_dir={shared_dir}/runs",
                f"train.run_name={name}", f"parallel.mode={mode}", *extra])
            run = Run(job, types.SimpleNamespace(resume=False, overwrite=True), sub)
            LOOPS[mode](run)
            if sub.Get_rank() == 0:
                logged = metrics.read(os.path.join(shared_dir, "runs", name, "metrics.h5"))
                ok = len(logged["steps"]["step"]) == 6 * (P if mode == "async" else 1)
                ok = ok and logged["evals"]["step"][-1] == 6 * (P if mode == "async" else 1)
        assert agreed(ok, COMM), (mode, P)

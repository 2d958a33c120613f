"""`python -m llmpi.train` with parallel.tensor > 1 and parallel.zero = 1, run as a user runs it:
loss curves of tensor-parallel and ZeRO-1 grids against one process (float32: the same samples,
only the order of additions differs, so within float32 rounding: rtol 1e-5 over 8 steps), resume
across grids through sharded checkpoints, sampling a tensor-parallel run, refusals, and the
memory benchmark's accounting."""
import json
import os

import h5py
import numpy as np
import pytest

from cli import run, single_process_only
from test_pipeline_train import corpus, log, train  # noqa: F401  (corpus is a fixture)

pytestmark = single_process_only


@pytest.fixture(scope="module")
def one(tmp_path_factory, corpus):  # noqa: F811
    out = tmp_path_factory.mktemp("one")
    train(out, corpus, name="one")
    return log(out, "one")


@pytest.mark.parametrize("np_,extra", [
    (2, ["--set", "parallel.tensor=2"]),
    (4, ["--set", "parallel.pipeline=2", "--set", "parallel.tensor=2", "--set", "parallel.micro_batches=2"]),
    (4, ["--set", "parallel.tensor=2", "--set", "parallel.zero=1", "--set", "parallel.allreduce=ring"]),
    (2, ["--set", "parallel.zero=1"]),
], ids=["K2", "S2xK2", "D2xK2-zero-ring", "D2-zero"])
def test_tensor_and_zero_loss_curves_match_one_process(tmp_path, corpus, one, np_, extra):  # noqa: F811
    proc = train(tmp_path, corpus, *extra, np=np_, name="grid")
    if "parallel.zero=1" in extra:
        assert "ZeRO-1" in proc.stdout, proc.stdout
    grid = log(tmp_path, "grid")
    np.testing.assert_allclose(grid["steps"]["loss"], one["steps"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(grid["evals"]["val_loss"], one["evals"]["val_loss"], rtol=1e-5)


def test_resume_across_tensor_grids_and_sample(tmp_path, corpus):  # noqa: F811
    """K=2 -> S=2 x K=2 -> one process, through checkpoints in which each shard wrote its own part
    (no file holds a whole sharded matrix), against one uninterrupted run."""
    pinned = ["--set", "schedule.decay_iters=12"]
    train(tmp_path, corpus, *pinned, "--set", "train.max_iters=12", name="whole")
    train(tmp_path, corpus, *pinned, "--set", "parallel.tensor=2", "--set", "parallel.zero=1",
          "--set", "train.max_iters=4", np=2, name="hop")
    run_dir = os.path.join(str(tmp_path), "runs", "hop")
    assert {"stage0.t0_0000004.h5", "stage0.t1_0000004.h5"} <= set(os.listdir(run_dir))
    with h5py.File(os.path.join(run_dir, "stage0.t1_0000004.h5"), "r") as f:
        names = []
        f.visit(names.append)
        fc = next(f[n] for n in names if n.endswith("h.0.mlp.c_fc.weight") and isinstance(f[n], h5py.Dataset))
        assert fc.shape == (32, 64) and tuple(fc.attrs["full_shape"]) == (32, 128)
    train(tmp_path, corpus, *pinned, "--set", "parallel.pipeline=2", "--set", "parallel.tensor=2",
          "--set", "train.max_iters=8", "--resume", np=4, name="hop")
    train(tmp_path, corpus, *pinned, "--set", "train.max_iters=12", "--resume", name="hop")
    whole, hop = log(tmp_path, "whole"), log(tmp_path, "hop")
    np.testing.assert_array_equal(hop["steps"]["step"], whole["steps"]["step"])
    np.testing.assert_allclose(hop["steps"]["loss"], whole["steps"]["loss"], rtol=1e-5)
    proc = run(["-m", "llmpi.sample", "runs/hop", "--tokens", "10"], cwd=str(tmp_path), check=True)
    assert "step 12" in proc.stderr


@pytest.mark.parametrize("np_,extra,message", [
    (2, ["--set", "parallel.tensor=3"], "parallel.tensor = 3 must divide model.n_head = 2"),
    (3, ["--set", "parallel.tensor=2"], "parallel.pipeline x parallel.tensor = 1 x 2 does not divide the 3 ranks"),
    (2, ["--set", "parallel.zero=1", "--set", "parallel.mode=async"], "parallel.zero = 1 shards"),
    (2, ["--set", "parallel.zero=2"], "parallel.zero must be 0"),
    (2, ["--set", "parallel.tensor=2", "--set", "parallel.partition=auto"], "parallel.tensor > 1"),
])
def test_bad_tensor_jobs_are_one_line_and_exit_2(tmp_path, corpus, np_, extra, message):  # noqa: F811
    proc = train(tmp_path, corpus, *extra, np=np_, name="bad", check=False, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_bench_memory_accounts_for_every_shard(tmp_path):
    proc = run(["-m", "llmpi.bench", "memory", "--batch", "8", "--json"], cwd=str(tmp_path), check=True,
               timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    grids = result["grids"]
    assert result["optimizer_bytes_ratio_zero"] == pytest.approx(0.25, rel=1e-3)  # AdamW's m, v of 1/4 each
    assert 0.25 < result["param_bytes_ratio_tensor"] < 0.27  # the replicated LayerNorms, biases and wpe
    assert grids["D4"]["activation_bytes"] == pytest.approx(grids["1"]["activation_bytes"] / 4, rel=0.05)
    # model.recompute: each block keeps no (B, T, 4C) float32 GELU output ("gelu") and no two
    # (B, T, C) LayerNorm outputs either ("gelu+ln"), to the byte
    m = result["model"]
    values_per_c = m["n_layer"] * result["batch"] * m["block_size"] * m["n_embd"]
    assert grids["1"]["activation_bytes"] - grids["1_gelu"]["activation_bytes"] == 4 * values_per_c * 4
    assert grids["1"]["activation_bytes"] - grids["1_gelu_ln"]["activation_bytes"] == 6 * values_per_c * 4
    assert all(g["rss_bytes"] > g["total_bytes"] for g in grids.values())


def test_grid_auto_chooses_a_grid_that_fits_and_trains_like_one_process(tmp_path, corpus, one):  # noqa: F811
    """Every grid computes the same steps, so whichever the planner picks the curve is one process's;
    a memory limit below one whole model per rank (1.52 MiB in the planner's accounting of this
    model) must push it off plain data parallelism."""
    proc = train(tmp_path, corpus, "--set", "parallel.grid=auto", "--set", "parallel.memory_limit_mb=1.5", np=2,
                 name="auto")
    chosen = next(ln for ln in proc.stdout.splitlines() if ln.startswith("grid (auto):"))
    assert "runners-up" in chosen and not chosen.startswith("grid (auto): 2x1x1 (D"), chosen
    auto = log(tmp_path, "auto")
    np.testing.assert_allclose(auto["steps"]["loss"], one["steps"]["loss"], rtol=1e-5)


def test_plan_grid_auto_lists_every_candidate(tmp_path, corpus):  # noqa: F811
    from test_pipeline_train import SMALL
    proc = run(["-m", "llmpi.plan", "--grid", "auto", *SMALL, "--set", f"data.path={corpus}", "--json"], np=2,
               cwd=str(tmp_path), check=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    grids = {(c["D"], c["S"], c["K"], c["zero"]) for c in result["candidates"]}
    assert grids == {(2, 1, 1, 0), (2, 1, 1, 1), (1, 2, 1, 0), (1, 1, 2, 0)}
    assert result["chosen"]["fits"] and result["chosen"]["step_time"] == min(
        c["step_time"] for c in result["candidates"] if c["fits"])

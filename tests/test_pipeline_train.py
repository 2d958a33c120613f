"""`python -m llmpi.train` with parallel.pipeline > 1, run as a user runs it: the loss curve of
pipelines and grids against one process (float32: the same samples, only the order of additions
differs, so within float32 rounding), resume across grids, a killed stage, refusals, the
timeline, and format-1 checkpoints."""
import json
import os

import h5py
import numpy as np
import pytest

from cli import REPO, clean_env, run, single_process_only
from llmpi import config
from llmpi.model.gpt import gpt2_layout
from llmpi.training import metrics

pytestmark = single_process_only

SMALL = ["--set", "model.n_layer=4", "--set", "model.n_embd=32", "--set", "model.n_head=2",
         "--set", "model.block_size=16", "--set", "train.batch_size=8", "--set", "train.max_iters=8",
         "--set", "train.log_interval=4", "--set", "train.eval_interval=4", "--set", "train.eval_iters=2",
         "--set", "schedule.warmup_iters=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus") / "tiny.h5")
    run(["-m", "llmpi.data", "prepare", "--input", os.path.join(REPO, "llmpi", "model"), "--out", out], check=True)
    return out


def train(tmp_path, corpus, *extra, np=1, name="run", check=True, env=None, timeout=180):
    args = ["-m", "llmpi.train", *SMALL, "--set", f"data.path={corpus}", "--run-name", name, *extra]
    return run(args, np=np, cwd=str(tmp_path), timeout=timeout, check=check, env=env)


def log(tmp_path, name):
    return metrics.read(os.path.join(str(tmp_path), "runs", name, "metrics.h5"))


@pytest.mark.parametrize("np_,extra", [
    (2, ["--set", "parallel.pipeline=2"]),
    (2, ["--set", "parallel.pipeline=2", "--set", "parallel.schedule=gpipe", "--set", "parallel.micro_batches=3"]),
    (3, ["--set", "parallel.pipeline=3", "--set", "parallel.partition=1,2,1", "--set", "parallel.micro_batches=4"]),
    (4, ["--set", "parallel.pipeline=2", "--set", "parallel.allreduce=ring"]),
    (2, ["--set", "parallel.pipeline=2", "--set", "parallel.partition=auto", "--slowdown", "0=3"]),
], ids=["S2-1f1b", "S2-gpipe-m3", "S3-1,2,1", "2x2-ring", "S2-auto-slow-rank"])
def test_pipeline_loss_curve_matches_one_process(tmp_path, corpus, np_, extra):
    train(tmp_path, corpus, name="one")
    proc = train(tmp_path, corpus, *extra, np=np_, name="pipe")
    assert "grid:" in proc.stdout and "bubble" in proc.stdout
    if "parallel.partition=auto" in extra:  # the 3x slower rank 0 runs the stage with fewer blocks
        plan = next(ln for ln in proc.stdout.splitlines() if ln.startswith("grid:"))
        blocks = [int(b) for b in plan.split("blocks per stage [")[1].split("]")[0].split(",")]
        ranks = next(ln for ln in proc.stdout.splitlines() if ln.startswith("plan (auto)"))
        slow_stage = 0 if "ranks per stage [[0], [1]]" in ranks else 1
        assert blocks[slow_stage] < blocks[1 - slow_stage], proc.stdout
    one, pipe = log(tmp_path, "one"), log(tmp_path, "pipe")
    np.testing.assert_allclose(pipe["steps"]["loss"], one["steps"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(pipe["evals"]["val_loss"], one["evals"]["val_loss"], rtol=1e-5)
    assert (pipe["steps"]["bubble"] >= 0).all() and (one["steps"]["bubble"] == -1).all()


def test_resume_across_grids_and_sample(tmp_path, corpus):
    """S=2 -> S=1 -> S=4 through checkpoints (each stage wrote its own file), against one run
    (the LR schedule pinned to 12 steps, so that the legs' max_iters do not change it)."""
    pinned = ["--set", "schedule.decay_iters=12"]
    train(tmp_path, corpus, *pinned, "--set", "train.max_iters=12", name="whole")
    train(tmp_path, corpus, *pinned, "--set", "parallel.pipeline=2", "--set", "train.max_iters=4", np=2, name="hop")
    files = sorted(os.listdir(os.path.join(str(tmp_path), "runs", "hop")))
    assert {"ckpt_0000004.h5", "stage0_0000004.h5", "stage1_0000004.h5"} <= set(files)
    train(tmp_path, corpus, *pinned, "--set", "train.max_iters=8", "--resume", name="hop")
    train(tmp_path, corpus, *pinned, "--set", "parallel.pipeline=4", "--set", "train.max_iters=12", "--resume", np=4,
          name="hop")
    whole, hop = log(tmp_path, "whole"), log(tmp_path, "hop")
    np.testing.assert_array_equal(hop["steps"]["step"], whole["steps"]["step"])
    np.testing.assert_allclose(hop["steps"]["loss"], whole["steps"]["loss"], rtol=1e-5)
    proc = run(["-m", "llmpi.sample", "runs/hop", "--tokens", "10"], cwd=str(tmp_path), check=True)
    assert "step 12" in proc.stderr


def test_a_killed_stage_ends_the_job(tmp_path, corpus):
    proc = train(tmp_path, corpus, "--set", "parallel.pipeline=2", np=2, name="kill", check=False,
                 env=clean_env(LLMPI_FAULT="1:3"), timeout=90)
    assert proc.returncode != 0 and "injected failure on rank 1" in proc.stderr


@pytest.mark.parametrize("np_,extra,message", [
    (2, ["--set", "parallel.pipeline=3"], "does not divide the 2 ranks"),
    (2, ["--set", "parallel.pipeline=2", "--set", "train.micro_batch=2"], "leave train.micro_batch at 0"),
    (2, ["--set", "parallel.pipeline=2", "--set", "parallel.micro_batches=9"], "exceeds a replica's share of 8"),
    (2, ["--set", "parallel.pipeline=2", "--set", "parallel.mode=async"], "needs parallel.mode = 'sync'"),
    (2, ["--set", "parallel.pipeline=2", "--set", "parallel.partition=3,2"], "sums to 5 blocks; the model has 4"),
    (1, ["--set", "parallel.schedule=zigzag"], "choose one of: 1f1b, gpipe"),
])
def test_bad_pipeline_jobs_are_one_line_and_exit_2(tmp_path, corpus, np_, extra, message):
    proc = train(tmp_path, corpus, *extra, np=np_, name="bad", check=False, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_timeline_is_recorded_and_drawn(tmp_path, corpus):
    train(tmp_path, corpus, "--set", "parallel.pipeline=2", np=2, name="tl")
    proc = run(["-m", "llmpi.compare", "--timeline", "runs/tl"], cwd=str(tmp_path), check=True)
    assert "rank 0: compute" in proc.stdout and "rank 1: compute" in proc.stdout
    assert os.path.getsize(os.path.join(str(tmp_path), "runs", "tl", "timeline.png")) > 1000
    with h5py.File(os.path.join(str(tmp_path), "runs", "tl", "timeline.h5"), "r") as f:
        kinds = [str(k) for k in f.attrs["kinds"]]
        seen = {kinds[int(k)] for k in f["kind"][()]}
        assert {"F", "B", "allreduce", "optimizer"} <= seen and set(f["rank"][()]) == {0.0, 1.0}


def test_a_format_1_checkpoint_still_resumes(tmp_path, corpus):
    """The one-flat-buffer checkpoints of earlier llmpi versions load by name (any layout)."""
    train(tmp_path, corpus, "--set", "train.max_iters=4", name="old")
    run_dir = os.path.join(str(tmp_path), "runs", "old")
    with h5py.File(os.path.join(run_dir, "ckpt_0000004.h5"), "r") as f:
        job = config.from_toml_text(f.attrs["config"])
        manifest_attrs = dict(f.attrs)
    with h5py.File(os.path.join(run_dir, "stage0_0000004.h5"), "r") as f:
        flat = np.concatenate([f["params"][n][()].reshape(-1) for n, _ in gpt2_layout(job.model)])
        m = np.concatenate([f["optim/m"][n][()].reshape(-1) for n, _ in gpt2_layout(job.model)])
        v = np.concatenate([f["optim/v"][n][()].reshape(-1) for n, _ in gpt2_layout(job.model)])
        step = int(f.attrs["optim_step"])
    for name in os.listdir(run_dir):
        if name.endswith(".h5") and name != "metrics.h5":
            os.remove(os.path.join(run_dir, name))
    with h5py.File(os.path.join(run_dir, "ckpt_0000004.h5"), "w") as f:  # as llmpi 6b422f3 wrote them
        f["params"] = flat
        f["optim/m"], f["optim/v"], f["optim/step"] = m, v, np.array(step)
        f["sampler_rank0/epoch"], f["sampler_rank0/pos"] = np.array(0), np.array(0)
        for key in ("step", "config", "world_size", "mode"):
            f.attrs[key] = manifest_attrs[key]
        f.attrs["format_version"] = 1
    train(tmp_path, corpus, "--set", "parallel.pipeline=2", "--set", "train.max_iters=6", "--resume", np=2,
          name="old")
    assert log(tmp_path, "old")["steps"]["step"].tolist() == [1, 2, 3, 4, 5, 6]
    with h5py.File(os.path.join(run_dir, "ckpt_0000006.h5"), "r+") as f:
        f.attrs["format_version"] = 7
    proc = train(tmp_path, corpus, "--set", "train.max_iters=8", "--resume", name="old")
    assert "skipped ckpt_0000006.h5" in proc.stdout and "format version 7" in proc.stdout
    assert "resumed from runs/old/ckpt_0000004.h5" in proc.stdout  # the format-1 one, still there
    for name in os.listdir(run_dir):
        if name.startswith("ckpt_"):
            with h5py.File(os.path.join(run_dir, name), "r+") as f:
                f.attrs["format_version"] = 7
    proc = train(tmp_path, corpus, "--set", "train.max_iters=10", "--resume", name="old", check=False)
    assert proc.returncode == 2 and "format version 7" in proc.stderr and "no checkpoint" in proc.stderr


def test_a_model_over_one_ranks_memory_limit_trains_on_two_stages(tmp_path, corpus):
    limit = ["--set", "parallel.memory_limit_mb=1.5"]  # the whole model needs ~2.1 MiB, a stage ~0.7
    proc = train(tmp_path, corpus, *limit, name="big", check=False)
    assert proc.returncode == 2 and "parallel.memory_limit_mb gives it 1.5" in proc.stderr, proc.stderr
    assert "use more pipeline stages" in proc.stderr
    proc = train(tmp_path, corpus, *limit, "--set", "parallel.pipeline=2", np=2, name="big")
    assert "eval: step 8" in proc.stdout
    proc = train(tmp_path, corpus, "--set", "parallel.memory_limit_mb=1,2,3", np=2, name="other", check=False)
    assert proc.returncode == 2 and "3 values for 2 ranks" in proc.stderr


def test_bench_pipeline_reports_its_figures(tmp_path):
    proc = run(["-m", "llmpi.bench", "pipeline", "--steps", "8", "--batch", "16", "--micro-batches", "4", "--json"],
               cwd=str(tmp_path), check=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("bubble_measured", "bubble_theory", "activation_mb_1f1b", "activation_mb_gpipe", "plan_cut",
                "plan_error", "pipeline_vs_dp"):
        assert np.isfinite(result[key]), key
    assert result["bubble_theory"] == pytest.approx(1 / 5)
    # stage 0 keeps 2 micro-batches under 1F1B, all 8 under GPipe (m = 8 for the memory figure)
    assert result["activation_mb_gpipe"] == pytest.approx(4 * result["activation_mb_1f1b"])

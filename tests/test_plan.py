"""The planner's inputs and its command line: llmpi.parallel.profile gathers every rank's figures
(in both passes: one rank, and the 4 of `mpiexec -n 4 pytest --with-mpi`), and
`python -m llmpi.plan` runs as a user runs it (subprocesses, single-process pass only) in its
two modes, with bad inputs ending every rank with one line and exit 2. No timing is asserted:
only what the planner must do with whatever it measured (auto never predicts worse than uniform)."""
import json
import os

import numpy as np
import pytest

from cli import run, single_process_only
from llmpi.comm.world import world
from llmpi.config import ModelConfig, OptimConfig
from llmpi.model.gpt import GPT
from llmpi.parallel.profile import model_sizes, profile
from llmpi.training.optim import make_optimizer
from mpi_helpers import agreed
from test_assign import exhaustive

TINY = ["--set", "model.vocab_size=64", "--set", "model.n_layer=4", "--set", "model.n_embd=32",
        "--set", "model.n_head=2", "--set", "model.block_size=16", "--set", "train.batch_size=8"]


def test_profile_gathers_every_ranks_figures():
    comm = world()
    P, rank = comm.Get_size(), comm.Get_rank()
    S = 2 if P % 2 == 0 else 1
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32)
    prof = profile(comm, cfg, 2, S, lambda params, ops: make_optimizer(OptimConfig(), params, ops), repeats=1,
                   slowdown=1.0 + rank)
    costs = prof.costs()
    C, tokens = cfg.n_embd, 2 * cfg.block_size
    checks = [
        len(prof.ranks) == P and [r.slowdown for r in prof.ranks] == [1.0 + r for r in range(P)],
        all(r.block_time > 0 and r.embedding_time > 0 and r.head_time > 0 and r.optimizer_rate > 0
            for r in prof.ranks),
        all((r.allreduce_rate > 0) == (P // S > 1) and (r.send_time > 0) == (P > 1) for r in prof.ranks),
        all(r.state_factor == 4.0 for r in prof.ranks),  # params, grads, AdamW m and v
        prof.sizes.block_param_bytes == (12 * C * C + 13 * C) * 4,
        prof.sizes.block_activation_bytes == GPT(cfg).activation_bytes_per_token() / cfg.n_layer * tokens,
        costs.block_time.shape == (P, cfg.n_layer) and costs.ranks == P,
        model_sizes(cfg, 2) == prof.sizes,
    ]
    assert agreed(all(checks), comm), checks


def plan(*args, np=1):
    return run(["-m", "llmpi.plan", *args], np=np, timeout=180)


def one_error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("llmpi.plan: error: ")


@single_process_only
def test_plan_under_mpiexec_prints_the_plan_beside_uniform_and_json_last():
    proc = plan(*TINY, "--slowdown", "1=3", "--micro-batches", "4", "--repeats", "1", "--json", np=2)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "auto plan" in proc.stdout and "uniform plan" in proc.stdout and "per rank" in proc.stdout
    assert out["stages"] == 2 and out["replicas"] == 1 and out["micro_batches"] == 4 and out["micro_batch"] == 2
    assert [r["slowdown"] for r in out["ranks"]] == [1.0, 3.0]
    chosen, uniform = out["plan"], out["uniform"]
    assert sum(chosen["blocks"]) == 4 and len(chosen["blocks"]) == 2 and sorted(chosen["slots"][0]) == [0, 1]
    assert chosen["exact"] and uniform["blocks"] == [2, 2] and uniform["slots"] == [[0, 1]]
    assert chosen["step_time"] <= uniform["step_time"] * (1 + 1e-12)  # whatever was measured
    assert out["cut"] == pytest.approx(1 - chosen["step_time"] / uniform["step_time"])


@single_process_only
def test_plan_of_a_user_partition_with_gpipe_on_one_rank():
    proc = plan(*TINY, "--set", "model.n_layer=5", "--pipeline", "1", "--schedule", "gpipe",
                "--memory-limit-mb", "100", "--partition", "5", "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["plan"]["method"] == "user" and out["plan"]["blocks"] == [5] and out["plan"]["fits"] == [True]
    assert out["plan"]["capacity"] == [100 * 2 ** 20] and out["schedule"] == "gpipe"


@single_process_only
@pytest.mark.parametrize("args,np,message", [
    (["--pipeline", "1", "--memory-limit-mb", "0.5"], 2, "does not fit 1 pipeline stage"),
    (["--pipeline", "3"], 2, "does not divide the 2 ranks"),
    (["--partition", "1,2"], 2, "sums to 3 blocks"),
    (["--memory-limit-mb", "1,2,3"], 2, "3 values for 2 ranks"),
], ids=["infeasible", "stages", "partition", "limits"])
def test_bad_pipeline_inputs_end_every_rank_with_one_line(args, np, message):
    proc = plan(*TINY, "--repeats", "1", *args, np=np)
    assert one_error_line(proc) and message in proc.stderr, (proc.returncode, proc.stderr)


@single_process_only
def test_assign_solves_a_csv_instance(tmp_path):
    costs = [[4, 1, 3], [2, 0, 5], [3, 2, 2], [1, 4, np.inf]]
    loads, caps = [2, 1, 3, 2], [4, 3, 3]
    path = tmp_path / "costs.csv"
    path.write_text("# tasks x units\n" + "\n".join(",".join(str(v) for v in row) for row in costs) + "\n\n")
    for objective in ("total", "max"):
        proc = plan("--assign", str(path), "--loads", "2,1,3,2", "--capacities", "4,3,3", "--objective", objective,
                    "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["optimum"]["cost"] == exhaustive(costs, loads, caps, objective)
        assert all(g is None or g >= 0 for g in out["gap"].values())
        assert "optimum (exact" in proc.stdout and "greedy" in proc.stdout and "anneal" in proc.stdout


@single_process_only
def test_bad_assign_inputs_are_one_line_and_exit_2(tmp_path):
    good, bad, ragged = tmp_path / "good.csv", tmp_path / "bad.csv", tmp_path / "ragged.csv"
    good.write_text("1,2\n3,4\n")
    bad.write_text("1,2\n3,x\n")
    ragged.write_text("1,2\n3\n")
    cases = [
        (["--assign", str(bad), "--loads", "1,1", "--capacities", "2,2"], "line 2"),
        (["--assign", str(ragged), "--loads", "1,1", "--capacities", "2,2"], "rows have 1 or 2 numbers"),
        (["--assign", str(good), "--loads", "1,1,1", "--capacities", "2,2"], "3 loads for 2 tasks"),
        (["--assign", str(good), "--loads", "1,1", "--capacities", "2"], "1 capacities for 2 units"),
        (["--assign", str(good), "--loads", "3,3", "--capacities", "2,2"], "fits no unit"),
        (["--assign", str(good), "--loads", "2,2", "--capacities", "3,0"], "no assignment fits"),
        (["--assign", str(good), "--loads", "1,1"], "needs --loads"),
        (["--assign", os.path.join(str(tmp_path), "missing.csv"), "--loads", "1", "--capacities", "1"],
         "cannot read it"),
    ]
    for args, message in cases:
        proc = plan(*args)
        assert one_error_line(proc) and message in proc.stderr, (args, proc.returncode, proc.stderr)
    proc = plan("--assign", str(bad), "--loads", "1,1", "--capacities", "2,2", np=2)
    assert one_error_line(proc) and "line 2" in proc.stderr  # every rank exits 2, rank 0 prints once

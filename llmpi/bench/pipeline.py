"""`python -m llmpi.bench pipeline`: pipeline parallelism measured as a user runs it.

Every figure comes from `mpiexec -n 2 python -m llmpi.train` jobs (one rank per core, one BLAS
thread each) on one model of 12 blocks, or, for the memory, from one step of the stages in a
child job:
- bubble_measured: the median measured idle share of the step at S=2, m micro-batches (the
  trainer's own figure: 1 - compute / pipeline time per rank, mean over ranks), beside
  bubble_theory = (S - 1) / (m + S - 1);
- activation_mb_1f1b / activation_mb_gpipe: stage 0's peak activation memory at m=8, measured
  as the bytes of the distinct arrays its schedule keeps for backward;
- plan_cut: 1 - step(auto) / step(uniform) with rank 1 slowed 2x by --slowdown (ideal 1/3 for
  12 blocks: the slow rank should hold 4 of them); plan_error: |measured - predicted| / measured
  for the auto plan's step (predicted by llmpi.parallel.partition from the profile);
- pipeline_vs_dp: tokens/s of the S=2 pipeline over 2-replica data parallelism of the same model
  and batch. Step times are medians after WARMUP steps.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from llmpi.cli import ArgumentParser, run_main
from llmpi.errors import UserError

from ._common import LAUNCHER_VARS, emit_json, machine, run_training

WARMUP = 5
MODEL = ["model.n_layer=12", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
         "train.log_interval=1000", "train.eval_interval=0", "train.eval_iters=1", "schedule.warmup_iters=5"]


def _steps(m):
    wall = np.asarray(m["steps"]["wall"])
    return np.diff(wall[WARMUP:])


def memory_child(schedule, m):
    """One training step of S=2 stages (this process is one of 2 ranks) measuring stage 0's peak."""
    from llmpi.comm.world import world
    from llmpi.config import ModelConfig
    from llmpi.model.gpt import GPT
    from llmpi.parallel.grid import make_grid
    from llmpi.parallel.pipeline import StageStep, micro_batch_sizes
    from llmpi.training.pipeline import stage_bounds

    comm = world()
    cfg = ModelConfig(vocab_size=256, n_layer=12, n_head=4, n_embd=128, block_size=64)
    grid = make_grid(comm, 2)
    part = GPT(cfg, seed=0, blocks=stage_bounds("uniform", 12, 2)[grid.stage])
    step = StageStep(part, grid.pipeline, schedule)
    step.measure_memory = True
    sizes = micro_batch_sizes(16, m)
    rng = np.random.default_rng(0)
    batches = [tuple(rng.integers(0, 256, (2, n, 64))) for n in sizes]
    step.run(batches, sizes, 16)
    if comm.Get_rank() == 0:
        print(json.dumps({"peak_activation_bytes": step.peak_activation_bytes}))
    return 0


def _memory(schedule, m):
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", "2", sys.executable, "-m", "llmpi.bench.pipeline",
           "--child-memory", schedule, "--micro-batches", str(m)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_activation_bytes"] / 2**20


def main(argv=None):
    p = ArgumentParser(prog="python -m llmpi.bench pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="steps per training job")
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    p.add_argument("--micro-batches", type=int, default=8, help="m")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child-memory", default=None, choices=("1f1b", "gpipe"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_memory:
        return memory_child(args.child_memory, args.micro_batches)
    if args.steps < WARMUP + 3 or args.micro_batches < 1 or args.batch < 2 * args.micro_batches:
        raise UserError(f"--steps must be at least {WARMUP + 3}, --micro-batches at least 1 and --batch at least "
                        "2 x --micro-batches")
    m, S = args.micro_batches, 2
    common = [*MODEL, f"train.batch_size={args.batch}", f"train.max_iters={args.steps}"]
    pipe = [*common, "parallel.pipeline=2", f"parallel.micro_batches={m}"]
    with tempfile.TemporaryDirectory() as out:
        runs = {
            "dp": run_training(2, [*common, "train.run_name=dp"], out),
            "uniform": run_training(2, [*pipe, "train.run_name=uniform"], out),
            "slow_uniform": run_training(2, [*pipe, "parallel.slowdown=1=2", "train.run_name=slow_uniform"], out),
            "slow_auto": run_training(2, [*pipe, "parallel.slowdown=1=2", "parallel.partition=auto",
                                          "train.run_name=slow_auto"], out),
        }
    t = {k: float(np.median(_steps(v))) for k, v in runs.items()}
    auto_steps = _steps(runs["slow_auto"])
    predicted = float(runs["slow_auto"]["attrs"]["plan_step_s"])
    result = {
        "machine": machine(), "stages": S, "micro_batches": m, "batch": args.batch, "steps": args.steps,
        "bubble_measured": float(np.median(runs["uniform"]["steps"]["bubble"][WARMUP:])),
        "bubble_theory": (S - 1) / (m + S - 1),
        "activation_mb_1f1b": _memory("1f1b", 8), "activation_mb_gpipe": _memory("gpipe", 8),
        "plan_cut": 1 - t["slow_auto"] / t["slow_uniform"], "plan_cut_ideal": 1 / 3,
        "plan_error": float(np.median(np.abs(auto_steps - predicted) / auto_steps)),
        "plan_predicted_ms": 1e3 * predicted, "pipeline_vs_dp": t["dp"] / t["uniform"],
        "step_ms": {k: 1e3 * v for k, v in t.items()},
    }
    print(f"machine: {result['machine']}; 12 blocks x 128 channels, batch {args.batch} x 64 tokens, 2 ranks")
    print(f"bubble at S=2, m={m}: measured {100 * result['bubble_measured']:.1f}%, theory "
          f"{100 * result['bubble_theory']:.1f}%")
    print(f"stage 0 activations at m=8: 1f1b {result['activation_mb_1f1b']:.2f} MiB, gpipe "
          f"{result['activation_mb_gpipe']:.2f} MiB")
    print(f"rank 1 slowed 2x: uniform {t['slow_uniform'] * 1e3:.1f} ms/step, auto {t['slow_auto'] * 1e3:.1f} ms/step "
          f"(predicted {1e3 * predicted:.1f}): cut {100 * result['plan_cut']:.1f}% (ideal 33%), plan error "
          f"{100 * result['plan_error']:.1f}%")
    print(f"pipeline S=2 vs 2-replica data parallel: {result['pipeline_vs_dp']:.2f}x tokens/s "
          f"({t['uniform'] * 1e3:.1f} vs {t['dp'] * 1e3:.1f} ms/step)")
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="llmpi.bench pipeline") or 0)

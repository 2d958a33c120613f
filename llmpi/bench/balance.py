"""`python -m llmpi.bench balance`: balance none vs dynamic with one rank slowed 2x.

Side by side in one run: the same job with `--slowdown 1=2` (rank 1 sleeps as long as it
computes) under `parallel.balance = none` and `dynamic`, at 2 and at 4 ranks. Reports the
median step time after warm-up and the cut; the ideal cut for one rank at half speed is
1 - P / (2P - 1): 33% at 2 ranks and 43% at 4 ranks. Also checks that the
loss per sample is unchanged by balancing (max relative difference of the loss curves).
"""
import tempfile

import numpy as np

from llmpi.cli import ArgumentParser
from llmpi.errors import UserError

from ._common import emit_json, machine, run_training, step_seconds

SKIP_STEPS = 30  # warm-up and the first rebalance interval, left out of the step times
JOB = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
       "train.log_interval=1000", "train.eval_interval=0", "train.eval_iters=1",
       "parallel.balance_interval=10", "parallel.slowdown=1=2"]


def ideal_cut(P, factor=2.0):
    """Step time even-split / balanced for one rank `factor` times slower."""
    even = factor / P                       # the slow rank's share of the work, at its speed
    balanced = 1.0 / (P - 1 + 1.0 / factor)  # everyone finishes together
    return 1 - balanced / even


def main(argv=None):
    p = ArgumentParser(prog="python -m llmpi.bench balance")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=48, help="global batch (sequences)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.steps < SKIP_STEPS + 3 or args.batch < max(args.ranks) or min(args.ranks) < 2:
        raise UserError(f"--steps must be at least {SKIP_STEPS + 3} (the first {SKIP_STEPS} are warm-up and the first "
                        "rebalance), --ranks at least 2 and --batch at least the largest rank count")
    result = {"machine": machine()}
    with tempfile.TemporaryDirectory() as out:
        for P in args.ranks:
            runs = {}
            for mode in ("none", "dynamic"):
                runs[mode] = run_training(P, [*JOB, f"train.batch_size={args.batch}", f"train.max_iters={args.steps}",
                                              f"parallel.balance={mode}", f"train.run_name=bal{P}{mode}"], out)
            # Skip warm-up and the first rebalance interval before comparing step times.
            t_none, t_dyn = step_seconds(runs["none"], SKIP_STEPS), step_seconds(runs["dynamic"], SKIP_STEPS)
            a, b = runs["none"]["steps"]["loss"], runs["dynamic"]["steps"]["loss"]
            drift = float(np.max(np.abs(a - b) / np.abs(a)))
            cut = 1 - t_dyn / t_none
            result[f"cut_{P}"] = cut
            result[f"ideal_{P}"] = ideal_cut(P)
            result[f"loss_drift_{P}"] = drift
            print(f"{P} ranks, rank 1 slowed 2x, batch {args.batch}: none {1000 * t_none:.1f} ms/step, dynamic "
                  f"{1000 * t_dyn:.1f} ms/step, cut {100 * cut:.1f}% (ideal {100 * ideal_cut(P):.0f}%), "
                  f"loss curves differ by at most {100 * drift:.4f}%")
    print(f"machine: {machine()}")
    result["ratio"] = result.get("cut_2", 0.0) / ideal_cut(2)
    emit_json(result, args.json)
    return 0

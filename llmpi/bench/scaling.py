"""`python -m llmpi.bench scaling`: weak scaling of synchronous training and its comm share.

Runs the trainer as a user would (separate `mpiexec` jobs, one BLAS thread per rank),
with a fixed per-rank batch, at 1 and 2 ranks (efficiency = tokens/s at 2 ranks over
twice the tokens/s at 1), then at 4 ranks (on a 2-core machine these share cores) for
the share of step time spent communicating, and overlap on/off at 2 ranks.
"""
import tempfile

import numpy as np

from llmpi.cli import ArgumentParser
from llmpi.errors import UserError

from ._common import emit_json, machine, run_training, step_seconds

WARMUP_STEPS = 5  # steps left out of the step-time and comm medians
BABY = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
        "train.log_interval=1000", "train.eval_interval=0", "train.eval_iters=1"]


def measure(np_, per_rank, steps, out_dir, *extra):
    name = f"scale{np_}{'-'.join(e.replace('=', '') for e in extra)}"
    m = run_training(np_, [*BABY, f"train.batch_size={per_rank * np_}", f"train.max_iters={steps}",
                           f"train.run_name={name}", *extra], out_dir)
    t = step_seconds(m, WARMUP_STEPS)
    tokens = per_rank * np_ * 64
    comm = float(np.median(m["steps"]["comm"][WARMUP_STEPS:]))
    return {"ranks": np_, "step_ms": 1000 * t, "tokens_per_s": tokens / t, "comm_share": comm / t}


def main(argv=None):
    p = ArgumentParser(prog="python -m llmpi.bench scaling")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--per-rank", type=int, default=12, help="sequences per rank per step")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.steps < WARMUP_STEPS + 3 or args.per_rank < 1:
        raise UserError(f"--steps must be at least {WARMUP_STEPS + 3} (the first {WARMUP_STEPS} are warm-up) "
                        "and --per-rank at least 1")
    with tempfile.TemporaryDirectory() as out:
        rows = [measure(n, args.per_rank, args.steps, out) for n in (1, 2, 4)]
        overlap = measure(2, args.per_rank, args.steps, out, "parallel.overlap=true", "parallel.bucket_mb=0.5")
    print(f"machine: {machine()}\nbaby GPT shape, {args.per_rank} sequences x 64 tokens per rank, 1 BLAS thread/rank")
    for r in rows:
        print(f"  {r['ranks']} rank(s): {r['step_ms']:7.1f} ms/step {r['tokens_per_s']:10,.0f} tok/s "
              f"comm {100 * r['comm_share']:4.1f}%")
    eff = rows[1]["tokens_per_s"] / (2 * rows[0]["tokens_per_s"])
    saved = 1 - overlap["step_ms"] / rows[1]["step_ms"]
    print(f"weak-scaling efficiency 1 -> 2 ranks: {100 * eff:.1f}%")
    print(f"comm share at 4 ranks: {100 * rows[2]['comm_share']:.1f}%")
    print(f"overlap (Iallreduce buckets of 0.5 MiB during backward) at 2 ranks: {overlap['step_ms']:.1f} ms/step, "
          f"{100 * saved:+.1f}% step time saved")
    emit_json({"efficiency_1_to_2": eff, "comm_share_4": rows[2]["comm_share"], "overlap_saving_2": saved,
               "rows": rows, "machine": machine()}, args.json)
    return 0

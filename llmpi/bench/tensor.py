"""`python -m llmpi.bench tensor`: tensor parallelism's communication and step time on 2 ranks.

- comm_bytes_measured: the payload the tensor group all-reduced in one training step at K=2
  (llmpi.parallel.tensor.TensorGroup counts every all-reduce), from a child job (llmpi.bench._grid);
- comm_bytes_theory: Megatron's 4 all-reduces of (B, T, C) per block per step (2 forward after the
  row-parallel products, 2 backward before the column-parallel ones) plus what the vocab-parallel
  embedding and head add: the embedding's output and the head's input gradient, (B, T, C) each,
  and the parallel cross-entropy's three all-reduces of one number per token (max, target logit,
  sum of exponentials); comm_bytes_theory_blocks is the blocks' part alone;
- step_ms_k1 / step_ms_k2: median step time of `mpiexec -n 2 python -m llmpi.train` at
  parallel.tensor = 1 (two data replicas) and 2 (one replica, each block split in two), same model
  and global batch, one BLAS thread per rank, after WARMUP steps.
"""
import sys
import tempfile

import numpy as np

from llmpi.cli import ArgumentParser, run_main
from llmpi.errors import UserError

from ._common import emit_json, machine, run_training
from ._grid import measure

WARMUP = 5
MODEL = dict(vocab_size=256, n_layer=6, n_head=4, n_embd=256, block_size=64)


def theory(B, T, C, n_layer, itemsize):
    blocks = 4 * n_layer * B * T * C * itemsize
    vocab = (2 * B * T * C + 3 * B * T) * itemsize
    return blocks, blocks + vocab


def main(argv=None):
    p = ArgumentParser(prog="python -m llmpi.bench tensor", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25, help="steps per training job")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.steps < WARMUP + 3 or args.batch < 2:
        raise UserError(f"--steps must be at least {WARMUP + 3} and --batch at least 2")
    rows = measure(1, 1, 2, 0, MODEL, args.batch)
    measured = rows[0]["tensor_comm_bytes"]
    blocks, total = theory(args.batch, MODEL["block_size"], MODEL["n_embd"], MODEL["n_layer"], 4)
    common = [f"model.{k}={v}" for k, v in MODEL.items() if k != "vocab_size"] + [
        f"train.batch_size={args.batch}", f"train.max_iters={args.steps}", "train.log_interval=1000",
        "train.eval_interval=0", "train.eval_iters=1", "schedule.warmup_iters=5"]
    with tempfile.TemporaryDirectory() as out:
        runs = {k: run_training(2, [*common, f"parallel.tensor={k}", f"train.run_name=k{k}"], out) for k in (1, 2)}
    step_ms = {k: 1e3 * float(np.median(np.diff(np.asarray(m["steps"]["wall"])[WARMUP:]))) for k, m in runs.items()}
    result = {"machine": machine(), "model": MODEL, "batch": args.batch, "steps": args.steps,
              "comm_bytes_measured": measured, "comm_bytes_theory": total, "comm_bytes_theory_blocks": blocks,
              "step_ms_k1": step_ms[1], "step_ms_k2": step_ms[2]}
    print(f"machine: {result['machine']}; {MODEL['n_layer']} blocks x {MODEL['n_embd']} channels, batch "
          f"{args.batch} x {MODEL['block_size']} tokens, float32, 2 ranks")
    print(f"tensor all-reduce payload per step at K=2: measured {measured / 2**20:.3f} MiB, theory "
          f"{total / 2**20:.3f} MiB ({blocks / 2**20:.3f} MiB of it the blocks' 4 x B T C each)")
    print(f"step time: K=1 (2 replicas) {step_ms[1]:.1f} ms, K=2 (1 replica, split blocks) {step_ms[2]:.1f} ms")
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="llmpi.bench tensor") or 0)

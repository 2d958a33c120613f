"""One training step of a D x S x K grid in a child MPI job, with llmpi's own accounting of what it
allocated (shared by `bench memory` and `bench tensor`).

The child builds what the trainer builds for its rank (the stage's blocks, its tensor shards, the
optimizer, plain or ZeRO-1 over the data group), runs one forward/backward of the schedule with
the activation accounting of llmpi.parallel.pipeline on, reduces the gradient and steps; rank 0
prints one JSON line with every rank's bytes per category, its tensor-group all-reduce payload
and its peak RSS.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np

from ._common import LAUNCHER_VARS


def child(D, S, K, zero, cfg_kw, batch, micro_batches):
    from llmpi.comm.allreduce import allreduce_sum
    from llmpi.comm.p2p import exchange_add
    from llmpi.comm.world import world
    from llmpi.config import ModelConfig, OptimConfig
    from llmpi.model.gpt import GPT
    from llmpi.parallel.allocate import even_split
    from llmpi.parallel.grid import make_grid
    from llmpi.parallel.pipeline import StageStep, micro_batch_sizes
    from llmpi.parallel.tensor import TensorGroup
    from llmpi.parallel.zero import ShardedOptimizer
    from llmpi.training.optim import make_optimizer
    from llmpi.training.pipeline import stage_bounds

    comm = world()
    cfg = ModelConfig(**cfg_kw)
    grid = make_grid(comm, S, K=K)
    group = TensorGroup(grid.tensor)
    model = GPT(cfg, seed=0, blocks=stage_bounds("uniform", cfg.n_layer, S)[grid.stage],
                tensor=group if K > 1 else None)
    optim = OptimConfig()
    opt = (ShardedOptimizer(model.params, lambda part: make_optimizer(optim, part, model.ops), grid.data)
           if zero else make_optimizer(optim, model.params, model.ops))
    share = even_split(grid.D, batch)[grid.replica]
    sizes = micro_batch_sizes(share, micro_batches)
    rng = np.random.default_rng(grid.replica)
    batches = [tuple(rng.integers(0, cfg.vocab_size, (2, n, cfg.block_size))) for n in sizes]
    step = StageStep(model, grid.pipeline, "1f1b")
    step.measure_memory = True
    step.run(batches, sizes, batch)
    if S > 1 and (grid.first or grid.last):
        exchange_add(model.params.grad_views["wte"], S - 1 - grid.stage, grid.pipeline)
    if zero:
        opt.reduce(model.params.grad)
    else:
        allreduce_sum(model.params.grad, grid.data)
    opt.step()
    optimizer_bytes = (opt.state_bytes() if zero else
                       sum(v.nbytes for k, v in opt.state_dict().items() if k != "step"))
    row = {"param_bytes": int(model.params.data.nbytes), "grad_bytes": int(model.params.grad.nbytes),
           "optimizer_bytes": int(optimizer_bytes), "activation_bytes": int(step.peak_activation_bytes),
           "tensor_comm_bytes": int(group.bytes),
           "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    rows = comm.gather(row, root=0)
    grid.free()
    if comm.Get_rank() == 0:
        print(json.dumps(rows))
    comm.Barrier()
    return 0


def measure(D, S, K, zero, cfg_kw, batch, micro_batches=1, timeout=600):
    """Every rank's accounting (a list of dicts, by world rank) from an mpiexec -n D*S*K child."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", str(D * S * K), sys.executable, "-m",
           "llmpi.bench._grid", json.dumps(dict(D=D, S=S, K=K, zero=zero, cfg_kw=cfg_kw, batch=batch,
                                                micro_batches=micro_batches))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    sys.exit(child(**json.loads(p.parse_args().spec)))

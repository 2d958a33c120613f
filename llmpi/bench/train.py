"""`python -m llmpi.bench train`: training throughput of llmpi vs a PyTorch CPU GPT of the same shape.

Each side runs in its own subprocess (so peak RSS is its own, from getrusage in the
child) with the same BLAS/OpenMP thread count, the same batch and AdamW. The step
is zero_grad + forward + backward + clip + AdamW step on random tokens. llmpi runs twice: on the
fused CPU kernels (llmpi.cpu, the default path, `ratio`) and on the NumPy layers (`ratio_numpy`);
each is then broken down by layer type by timing its layer functions.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from llmpi.cli import THREAD_VARS, ArgumentParser, run_main
from llmpi.errors import UserError
from llmpi.model.stages import RECOMPUTE

from . import _profile, _train_gpu
from ._common import emit_json, machine, thread_scaling
from ._torch_ref import torch_gpt

# nanoGPT's shakespeare_char "baby GPT" shape scaled to a quick CPU run
CONFIGS = {
    "baby": dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, batch=12),
    "tiny": dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, batch=8),
    "small": dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, batch=8),
}
WARMUP = 3
VARIANTS = {"llmpi": "fused", "llmpi-numpy": "numpy"}  # child name -> train.cpu_kernels


def _batches(shape, steps, seed=0):
    r = np.random.default_rng(seed)
    V, B, T = shape["vocab_size"], shape["batch"], shape["block_size"]
    return [(r.integers(0, V, (B, T)), r.integers(0, V, (B, T))) for _ in range(steps)]


def _timed(step, batches):
    """Median seconds per step after WARMUP steps (the median shrugs off other load on a shared machine)."""
    for x, y in batches[:WARMUP]:
        step(x, y)
    times, cpu = [], []
    for x, y in batches[WARMUP:]:
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, y)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(times)), float(np.median(cpu))


def _llmpi_child(shape, steps, threads=1, kernels="fused", recompute="none"):
    from llmpi import backend
    from llmpi.config import ModelConfig
    from llmpi.model.gpt import GPT
    from llmpi.ops import select_cpu_kernels
    from llmpi.parallel.threaded import ThreadedGrad
    from llmpi.training.optim import AdamW

    backend.select("cpu")  # the process set-up of a CPU run (llmpi.cli.keep_freed_memory)
    select_cpu_kernels(kernels)  # compiles (or loads the cache) here, outside the timed steps
    cfg = ModelConfig(**{k: v for k, v in shape.items() if k != "batch"}, recompute=recompute)
    m = GPT(cfg, seed=0)
    opt = AdamW(m.params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, ops=m.ops)
    grad = ThreadedGrad(m, threads)  # threads == 1: plain forward + backward

    def step(x, y, timed=_profile.untimed):
        timed("zero_grad", m.params.zero_grad)
        grad.forward_backward(x, y)
        timed("clip", m.ops.clip_grad_norm, m.params.grad, 1.0)
        timed("adamw", opt.step)

    batches = _batches(shape, steps + WARMUP)
    step_s, cpu_s = _timed(step, batches)
    # then a few more steps with every op timed, for the breakdown
    n = max(3, min(steps, 10))
    with _profile.timed_ops(m, _profile.HostClock()) as clock:
        t0 = time.perf_counter()
        for x, y in batches[:n]:
            step(x, y, clock.time)
        per_step = (time.perf_counter() - t0) / n
    return step_s, cpu_s, _profile.per_step_ms(clock, n, per_step)


def _torch_child(shape, steps, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch_gpt(shape)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in _batches(shape, steps + WARMUP)]
    return _timed(step, batches)


def child(args):
    shape = CONFIGS[args.config]
    if args.child in VARIANTS:
        step_s, cpu_s, breakdown = _llmpi_child(shape, args.steps, args.threads, VARIANTS[args.child], args.recompute)
    else:
        (step_s, cpu_s), breakdown = _torch_child(shape, args.steps, args.threads), {}
    tokens = shape["batch"] * shape["block_size"]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(dict(step_s=step_s, cpu_s=cpu_s, tokens_per_s=tokens / step_s, peak_rss_mb=rss_mb, breakdown_ms=breakdown)))
    return 0


def _run_child(which, args):
    env = dict(os.environ, **{v: str(args.threads) for v in THREAD_VARS})
    cmd = [sys.executable, "-m", "llmpi.bench.train", "--child", which, "--threads", str(args.threads),
           "--steps", str(args.steps), "--config", args.config, "--recompute", args.recompute]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{which} benchmark child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _torch_available():
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def _batches_list(text):
    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep takes comma-separated batch sizes, got {text!r}") from None
    if any(b < 1 for b in batches):
        raise argparse.ArgumentTypeError(f"--sweep batch sizes must be at least 1, got {text!r}")
    return batches


def main(argv=None):
    ap = ArgumentParser(prog="python -m llmpi.bench train", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line last")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for both sides")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CPU, 10 GPU)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="baby", help="model shape")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="gpu: llmpi (CuPy + kernels) vs PyTorch on one GPU, see llmpi.bench._train_gpu")
    ap.add_argument("--shape", choices=sorted(_train_gpu.SHAPES), default="gpt2", help="GPU model shape")
    ap.add_argument("--batch", type=int, default=8, help="GPU batch (sequences of block_size tokens)")
    ap.add_argument("--sweep", type=_batches_list, default=(16, 32),
                    help="GPU: further batch sizes for llmpi bf16 and torch bf16, comma-separated ('' for none)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="GPU: skip the torch.compile run")
    ap.add_argument("--warmup", type=int, default=3, help="GPU warm-up steps, not timed")
    ap.add_argument("--no-torch", dest="with_torch", action="store_false", help="GPU: skip the PyTorch runs")
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16", "bf16_graph"), default="tf32",
                    help=argparse.SUPPRESS)
    ap.add_argument("--recompute", choices=tuple(RECOMPUTE), default="none",
                    help="llmpi's model.recompute (gelu, gelu+ln: backward recomputes those outputs)")
    ap.add_argument("--child", choices=(*VARIANTS, "torch", "torch_compile"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.repeats < 1 or args.warmup < 0:
        raise UserError("--steps and --repeats must be at least 1, --warmup at least 0")
    if args.device == "gpu":
        args.steps = args.steps or 10
        return _train_gpu.main(args)
    args.steps = args.steps or 20
    if args.child:
        return child(args)
    shape = CONFIGS[args.config]
    print(f"llmpi.bench train: config {args.config} {shape}, {args.threads} thread(s), {args.steps} steps, "
          f"model.recompute {args.recompute}")
    print(f"machine: {machine()}")
    scaling = []
    if args.threads > 1:
        print(f"threads: llmpi runs {args.threads} compute threads over batch chunks with 1 BLAS thread each "
              f"(llmpi.parallel.threaded); torch runs {args.threads} intra-op threads")
        scaling.append(thread_scaling(args.threads))
    # alternate the two sides and keep each one's best run, so a burst of outside load hits both alike
    ours = ref = plain = None
    have_torch = _torch_available()
    best = lambda old, run: run if old is None or run["step_s"] < old["step_s"] else old  # noqa: E731
    for _ in range(args.repeats):
        ours = best(ours, _run_child("llmpi", args))
        plain = best(plain, _run_child("llmpi-numpy", args))
        if have_torch:
            run = _run_child("torch", args)
            ref = run if ref is None or run["step_s"] < ref["step_s"] else ref
    if args.threads > 1:
        scaling.append(thread_scaling(args.threads))
        print(f"machine: {args.threads} threads of GEMMs at once ran {scaling[0]:.2f}x / {scaling[1]:.2f}x the "
              f"work of one (before / after the runs; {args.threads}.0 on idle, unshared cores)")
    result = {"config": args.config, "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
              "recompute": args.recompute,
              "machine_thread_scaling": scaling or None,
              "llmpi_threading": (f"{args.threads} compute threads over batch chunks, 1 BLAS thread each"
                                  if args.threads > 1 else "1 thread"),
              "torch_threading": f"{args.threads} intra-op thread(s)",
              "llmpi_tokens_per_s": ours["tokens_per_s"], "llmpi_step_ms": ours["step_s"] * 1e3,
              "llmpi_cpu_ms_per_step": ours["cpu_s"] * 1e3,
              "llmpi_peak_rss_mb": ours["peak_rss_mb"],
              "llmpi_breakdown_ms": ours["breakdown_ms"], "llmpi_kernels": "fused (llmpi.cpu, Numba)",
              "llmpi_numpy_tokens_per_s": plain["tokens_per_s"], "llmpi_numpy_step_ms": plain["step_s"] * 1e3,
              "llmpi_numpy_cpu_ms_per_step": plain["cpu_s"] * 1e3, "llmpi_numpy_breakdown_ms": plain["breakdown_ms"]}
    print(f"llmpi : {ours['tokens_per_s']:10.0f} tok/s  {ours['step_s'] * 1e3:8.2f} ms/step  "
          f"{ours['cpu_s'] * 1e3:8.2f} CPU ms/step  peak RSS {ours['peak_rss_mb']:.0f} MiB  (fused kernels)")
    print(f"numpy : {plain['tokens_per_s']:10.0f} tok/s  {plain['step_s'] * 1e3:8.2f} ms/step  "
          f"{plain['cpu_s'] * 1e3:8.2f} CPU ms/step  (the NumPy layers)")
    if have_torch:
        result.update(torch_tokens_per_s=ref["tokens_per_s"], torch_step_ms=ref["step_s"] * 1e3,
                      torch_cpu_ms_per_step=ref["cpu_s"] * 1e3, cpu_ratio=ref["cpu_s"] / ours["cpu_s"],
                      torch_peak_rss_mb=ref["peak_rss_mb"], ratio=ours["tokens_per_s"] / ref["tokens_per_s"],
                      ratio_numpy=plain["tokens_per_s"] / ref["tokens_per_s"])
        print(f"torch : {ref['tokens_per_s']:10.0f} tok/s  {ref['step_s'] * 1e3:8.2f} ms/step  "
              f"{ref['cpu_s'] * 1e3:8.2f} CPU ms/step  peak RSS {ref['peak_rss_mb']:.0f} MiB")
        print(f"ratio llmpi/torch: {result['ratio']:.2f}x tokens/s, {result['cpu_ratio']:.2f}x by CPU time "
              "(CPU time is steadier on a loaded machine)")
    else:
        result.update(torch_tokens_per_s=None, ratio=None, ratio_numpy=None)
        print("torch : not installed, reference skipped (pip install torch)")
    print("llmpi step by layer (ms per step, timers on" + (", summed over threads):" if args.threads > 1 else "):"))
    print(f"  {'op':32s} {'fused':>8s} {'numpy':>8s}")
    for k in dict.fromkeys([*result["llmpi_breakdown_ms"], *result["llmpi_numpy_breakdown_ms"]]):
        print(f"  {k:32s} {result['llmpi_breakdown_ms'].get(k, 0.0):8.2f} {result['llmpi_numpy_breakdown_ms'].get(k, 0.0):8.2f}")
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="llmpi.bench train") or 0)

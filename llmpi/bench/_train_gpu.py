"""`python -m llmpi.bench train --device gpu`: llmpi on one GPU (CuPy + our kernels) against an
eager PyTorch GPT of the same shape on the same GPU, at GPT-2 124M by default.

Each variant runs in its own subprocess (its own CUDA context and memory pool):
- llmpi fp32: float32 everywhere, cuBLAS in plain fp32 (CuPy's default);
- llmpi tf32: the same with CUPY_TF32=1, so cuBLAS may use TF32 tensor cores and attention
  runs on TF32 tensor cores (kernels/attention_tc.cu);
- llmpi bf16: model.dtype = "bf16": bf16 activations between the kernels, every matmul on bf16
  inputs (cuBLAS GemmEx, fp32 accumulate, llmpi.gpu.bf16), bf16 tensor-core attention, fp32
  master weights, optimizer state and statistics;
- llmpi bf16_graph: the same step as the trainer's train.cuda_graph runs it: forward+backward
  and the clipped update each replayed as a CUDA graph (llmpi.training.graphed);
- torch tf32: float32 with TF32 matmuls allowed, flash SDPA, fused AdamW;
- torch bf16: the same under bf16 autocast (fp32 master weights);
- torch compile bf16: torch bf16 with the model under torch.compile (when it compiles on the
  machine; --no-compile skips it).
The batch sweep (--sweep, default 16,32 beside --batch 8) runs llmpi bf16 (with graphs) and torch
bf16 at each further batch size: MFU depends on it, and `mfu_bf16` is llmpi's best over the sweep.
Headline keys: `ratio_bf16` (llmpi bf16 / torch bf16 at --batch; llmpi's step with CUDA graphs,
or without them if that run failed: `bf16_graph` says which), `ratio_bf16_eager` (without graphs),
`mfu_bf16`, `best_batch_bf16`, `ratio_bf16_vs_compile`, `ratio_tf32`; `ratio` is `ratio_bf16`.
A step is zero_grad + forward + backward + clip + AdamW on random tokens; the median of
the timed steps counts (a device synchronize closes each step), warm-up steps excluded.
After them each llmpi variant runs PROFILED_STEPS more with CUDA events around every op
(llmpi.bench._profile): the per-op milliseconds ("breakdown_ms" in its JSON).

MFU: model FLOPs per token = 6 N + 6 L T C, N the parameters without wpe (wte counted once,
as the LM head matmul), 6 L T C the causal attention matmuls (QK^T and AV forward, twice
that backward; half of nanoGPT's non-causal 12 L T C), over the card's dense peak:
494.5 TFLOP/s TF32 and 989 TFLOP/s bf16 for an H100 SXM, and an H200 (the same chip with more memory); a measured TF32 matmul too.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

from . import _profile
from ._common import emit_json

SHAPES = {
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "small": dict(vocab_size=500, block_size=128, n_layer=2, n_head=2, n_embd=128),
}
PEAK = {"tf32": 494.5e12, "bf16": 989e12}  # H100 SXM and H200 dense tensor-core peaks
PROFILED_STEPS = 3  # steps timed op by op after the timed steps
BREAKDOWN_SHOWN = 12  # largest entries printed per llmpi run (the JSON has them all)
VARIANTS = (("llmpi", "fp32"), ("llmpi", "tf32"), ("llmpi", "bf16"), ("llmpi", "bf16_graph"), ("torch", "tf32"),
            ("torch", "bf16"), ("torch_compile", "bf16"))
SWEPT = (("llmpi", "bf16_graph"), ("torch", "bf16"))  # the variants the batch sweep runs
COMPILE_TIMEOUT_S = 180


def flops_per_token(s):
    L, T, C, V = s["n_layer"], s["block_size"], s["n_embd"], s["vocab_size"]
    n = V * C + L * 12 * C * C + L * 13 * C + 2 * C  # all parameters but wpe
    return 6 * n + 6 * L * T * C


def _time_steps(step, sync, warmup, steps):
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _llmpi_child(s, batch, warmup, steps, precision, recompute="none"):
    from llmpi import backend
    from llmpi.config import ModelConfig
    from llmpi.model.gpt import GPT
    from llmpi.training.optim import AdamW

    cp = backend.select("gpu")
    dtype = "bf16" if precision.startswith("bf16") else "float32"
    m = GPT(ModelConfig(**s, dtype=dtype, recompute=recompute), xp=cp, seed=0)
    opt = AdamW(m.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, ops=m.ops)
    r = cp.random.default_rng(0)
    x, y = (r.integers(0, s["vocab_size"], (batch, s["block_size"])) for _ in range(2))
    if precision == "bf16_graph":
        return _graphed_child(cp, m, opt, x, y, max(warmup, 2), steps)  # step 1 eager, step 2 captured
    losses = []

    def step(timed=_profile.untimed):
        timed("zero_grad", m.params.zero_grad)
        _, loss, cache = m.forward(x, y)
        m.backward(cache)
        timed("clip", m.ops.clip_grad_norm, m.params.grad, 1.0)
        timed("adamw", opt.step)
        losses.append(loss)

    t = _time_steps(step, backend.synchronize, warmup, steps)
    peak = cp.get_default_memory_pool().total_bytes()  # what the pool holds: it keeps freed blocks, so its peak
    # then a few steps with CUDA events around every op, for the breakdown
    n = min(steps, PROFILED_STEPS)
    with _profile.timed_ops(m, _profile.EventClock(cp)) as clock:
        profiled_s = _time_steps(lambda: step(clock.time), backend.synchronize, 0, n)
    return dict(step_s=t, peak_mem_mb=peak / 2**20, first_loss=float(losses[0]), last_loss=float(losses[-1]),
                breakdown_ms=_profile.per_step_ms(clock, n, profiled_s))


def _graphed_child(cp, m, opt, x, y, warmup, steps):
    """The llmpi step with CUDA graphs (no per-op breakdown: a replay runs no Python per op)."""
    from llmpi import backend
    from llmpi.gpu.graph import Graphs
    from llmpi.training.graphed import GraphedStep
    graphed = GraphedStep(m, opt, x.shape[0], 1.0, Graphs())
    losses = []

    def step():
        m.params.zero_grad()
        graphed.forward_backward(x, y)
        graphed.update(1e-4)
        losses.append(graphed.loss_sum / x.shape[0])  # the mean, read after the timing: no host wait in a step
        graphed.loss_sum.fill(0)

    t = _time_steps(step, backend.synchronize, warmup, steps)
    return dict(step_s=t, peak_mem_mb=(cp.get_default_memory_pool().total_bytes() + graphed.capture.pool.total_bytes())
                / 2**20, first_loss=float(losses[0]), last_loss=float(losses[-1]))


def _torch_child(s, batch, warmup, steps, precision, compiled=False):
    import torch

    from ._torch_ref import torch_gpt

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch_gpt(s).to(dev)
    forward = torch.compile(model) if compiled else model  # compiled during the warm-up steps
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=True)
    x, y = (torch.randint(0, s["vocab_size"], (batch, s["block_size"]), device=dev) for _ in range(2))
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())

    t = _time_steps(step, torch.cuda.synchronize, warmup, steps)
    return dict(step_s=t, peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20,
                first_loss=float(losses[0]), last_loss=float(losses[-1]))


def _matmul_tf32(n=8192):
    """Measured FLOP/s of an n^3 float32 matmul with TF32 allowed (torch), or None."""
    try:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = True
        a = torch.randn(n, n, device="cuda")
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        return 2 * n ** 3 * 10 / (time.perf_counter() - t0)
    except Exception:
        return None


def child(args):
    s = SHAPES[args.shape]
    if args.child == "llmpi":
        res = _llmpi_child(s, args.batch, args.warmup, args.steps, args.precision, args.recompute)
    else:
        res = _torch_child(s, args.batch, args.warmup, args.steps, args.precision, args.child == "torch_compile")
    print(json.dumps(res))
    return 0


def _run(which, precision, args, batch):
    env = dict(os.environ, CUPY_TF32="0" if precision == "fp32" else "1")
    cmd = [sys.executable, "-m", "llmpi.bench.train", "--device", "gpu", "--child", which,
           "--precision", precision, "--shape", args.shape, "--batch", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--recompute", args.recompute]
    try:  # torch.compile may take minutes on a new machine: it gets COMPILE_TIMEOUT_S, then it is reported
        res = subprocess.run(cmd, env=env, capture_output=True, text=True,
                             timeout=COMPILE_TIMEOUT_S if which == "torch_compile" else None)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {COMPILE_TIMEOUT_S} s (torch.compile)"}
    if res.returncode != 0:
        return {"error": (res.stderr or res.stdout)[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _measure(which, precision, args, batch, s, fpt):
    """One variant at one batch size -> its result dict (or {"error": ...}), printed."""
    r = _run(which, precision, args, batch)
    key = f"{which}_{precision}"
    if "error" in r:
        print(f"{key:18s} batch {batch:3d}: FAILED\n{r['error']}")
        return r
    tps = batch * s["block_size"] / r["step_s"]
    peak = PEAK["bf16" if precision.startswith("bf16") else "tf32"]
    r.update(batch=batch, tokens_per_s=tps, mfu=tps * fpt / peak, tflops=tps * fpt / 1e12)
    print(f"{key:18s} batch {batch:3d}: {tps:10.0f} tok/s  {r['step_s'] * 1e3:8.1f} ms/step  {r['tflops']:6.1f} TFLOP/s  "
          f"MFU {100 * r['mfu']:5.1f}% of {'bf16' if precision.startswith('bf16') else 'TF32'} peak  "
          f"mem {r['peak_mem_mb']:.0f} MiB  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    if "breakdown_ms" in r:
        print("    by op (ms per step, CUDA events): " + ", ".join(
            f"{k} {v:.2f}" for k, v in list(r["breakdown_ms"].items())[:BREAKDOWN_SHOWN]))
    return r


def _speed(run):
    return run.get("tokens_per_s") if run else None


def main(args):
    from llmpi.backend import gpu_available
    if not gpu_available():
        print("no GPU")
        if args.json:
            print(json.dumps({"skipped": "no GPU"}))
        return 0
    if args.child:
        return child(args)
    from llmpi import backend
    backend.select("gpu")
    s = SHAPES[args.shape]
    fpt = flops_per_token(s)
    measured = _matmul_tf32()
    print(f"llmpi.bench train --device gpu: {args.shape} {s}, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, on {backend.device_name}")
    print(f"model FLOPs/token 6N + 6LTC = {fpt / 1e9:.3f} GFLOP; peaks: TF32 {PEAK['tf32'] / 1e12:.1f}, "
          f"bf16 {PEAK['bf16'] / 1e12:.0f} TFLOP/s (H100 SXM, H200), measured TF32 matmul "
          + (f"{measured / 1e12:.1f} TFLOP/s" if measured else "n/a"))
    result = dict(shape=args.shape, batch=args.batch, steps=args.steps, recompute=args.recompute,
                  device=backend.device_name,
                  flops_per_token=fpt, peak_tf32=PEAK["tf32"], peak_bf16=PEAK["bf16"],
                  measured_tf32_matmul=measured, runs={}, sweep={})
    failed = False
    for which, precision in VARIANTS:
        if (which != "llmpi" and not args.with_torch) or (which == "torch_compile" and not args.compile):
            continue
        r = _measure(which, precision, args, args.batch, s, fpt)
        result["runs"][f"{which}_{precision}"] = r
        # torch.compile "when it works on the device": its failure is reported, not a failed bench
        failed |= "error" in r and which != "torch_compile"
    runs = result["runs"]
    graph_ran = "error" not in runs.get("llmpi_bf16_graph", {"error": "not run"})
    best_bf16 = "llmpi_bf16_graph" if graph_ran else "llmpi_bf16"
    result["bf16_graph"] = graph_ran
    ratios = {"ratio_bf16": (best_bf16, "torch_bf16"), "ratio_bf16_eager": ("llmpi_bf16", "torch_bf16"),
              "ratio_tf32": ("llmpi_tf32", "torch_tf32"),
              "ratio_fp32_vs_torch_tf32": ("llmpi_fp32", "torch_tf32"),
              "ratio_bf16_vs_torch_tf32": ("llmpi_bf16", "torch_tf32"),
              "ratio_bf16_vs_compile": (best_bf16, "torch_compile_bf16")}
    for name, (ours, ref) in ratios.items():
        a, b = _speed(runs.get(ours)), _speed(runs.get(ref))
        result[name] = a / b if a and b else None
        if result[name]:
            print(f"{name}: {ours} / {ref} = {result[name]:.2f}x tokens/s")
    best = (runs.get(best_bf16, {}).get("mfu"), args.batch)
    for batch in args.sweep:
        point = {}
        for which, precision in SWEPT:
            precision = precision if which != "llmpi" or graph_ran else "bf16"
            if which == "llmpi" or args.with_torch:
                point[which] = _measure(which, precision, args, batch, s, fpt)
                failed |= "error" in point[which]
        a, b = _speed(point.get("llmpi")), _speed(point.get("torch"))
        point["ratio_bf16"] = a / b if a and b else None
        result["sweep"][str(batch)] = point
        mfu = point["llmpi"].get("mfu")
        if mfu and (best[0] is None or mfu > best[0]):
            best = (mfu, batch)
    result["mfu_bf16"], result["best_batch_bf16"] = best
    if best[0]:
        print(f"mfu_bf16: {100 * best[0]:.1f}% at batch {best[1]} (llmpi bf16, best of batches "
              f"{', '.join(str(b) for b in [args.batch, *args.sweep])})")
    result["ratio"] = result["ratio_bf16"]
    emit_json(result, args.json)
    return 1 if failed else 0

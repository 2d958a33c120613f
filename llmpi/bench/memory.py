"""`python -m llmpi.bench memory`: bytes per rank of one fixed model at five grids.

One training step of GPT (8 blocks, 256 channels, 8 heads, byte vocabulary, block 64, global
batch 16) at grids 1, 1 with model.recompute = "gelu" and "gelu+ln", D=4, D=4 with ZeRO-1, K=4
and S=2 x K=2, each in its own `mpiexec` child
(llmpi.bench._grid). Memory is llmpi's own accounting of what it allocated, per category:
parameters and gradients (the stage's flat buffers: only its shards), optimizer state (AdamW's
moments; ZeRO-1: those of its slice) and peak activations (the distinct arrays the schedule keeps
for backward); the process's peak RSS stands beside it (it includes Python, NumPy and MPI).
Each figure is the largest over the grid's ranks.
Headline: optimizer_bytes_ratio_zero (ZeRO-1 over plain at D=4; ideal 0.25),
param_bytes_ratio_tensor (K=4 over K=1; ideal 0.25 plus the replicated LayerNorms, biases and wpe)
and activation_bytes_ratio_recompute / _recompute_ln (the GELU, and the LayerNorms too, recomputed
over kept, one rank; the accounting of llmpi.model.gpt.block_activation_bytes predicts them).
"""
import sys

from llmpi.cli import ArgumentParser, run_main

from ._common import emit_json, machine
from ._grid import measure

MODEL = dict(vocab_size=256, n_layer=8, n_head=8, n_embd=256, block_size=64)
GRIDS = {"1": (1, 1, 1, 0), "1_gelu": (1, 1, 1, 0), "1_gelu_ln": (1, 1, 1, 0), "D4": (4, 1, 1, 0),
         "D4_zero": (4, 1, 1, 1), "K4": (1, 1, 4, 0), "S2_K2": (1, 2, 2, 0)}  # name: D, S, K, zero
RECOMPUTE = {"1_gelu": "gelu", "1_gelu_ln": "gelu+ln"}  # grid name: its model.recompute where not "none"
CATEGORIES = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes")


def main(argv=None):
    p = ArgumentParser(prog="python -m llmpi.bench memory", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    grids = {}
    for name, (D, S, K, zero) in GRIDS.items():
        rows = measure(D, S, K, zero, dict(MODEL, recompute=RECOMPUTE.get(name, "none")), args.batch)
        grid = {key: max(r[key] for r in rows) for key in (*CATEGORIES, "rss_bytes")}
        grid["total_bytes"] = max(sum(r[key] for key in CATEGORIES) for r in rows)
        grid.update(D=D, S=S, K=K, zero=zero)
        grids[name] = grid
    result = {
        "machine": machine(), "model": MODEL, "batch": args.batch, "grids": grids,
        "optimizer_bytes_ratio_zero": grids["D4_zero"]["optimizer_bytes"] / grids["D4"]["optimizer_bytes"],
        "param_bytes_ratio_tensor": grids["K4"]["param_bytes"] / grids["1"]["param_bytes"],
        "total_bytes_ratio_tensor": grids["K4"]["total_bytes"] / grids["1"]["total_bytes"],
        "activation_bytes_ratio_recompute": grids["1_gelu"]["activation_bytes"] / grids["1"]["activation_bytes"],
        "activation_bytes_ratio_recompute_ln": grids["1_gelu_ln"]["activation_bytes"] / grids["1"]["activation_bytes"],
    }
    mib = 2.0**-20
    print(f"machine: {result['machine']}; {MODEL['n_layer']} blocks x {MODEL['n_embd']} channels, batch "
          f"{args.batch} x {MODEL['block_size']} tokens; MiB per rank (the largest rank)")
    print(f"{'grid':>9} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8} {'RSS':>8}")
    for name, g in grids.items():
        print(f"{name:>9} " + " ".join(f"{g[k] * mib:8.2f}" for k in (*CATEGORIES, "total_bytes", "rss_bytes")))
    print(f"optimizer state ZeRO-1 / plain at D=4: {result['optimizer_bytes_ratio_zero']:.3f} (ideal 0.25); "
          f"parameters K=4 / K=1: {result['param_bytes_ratio_tensor']:.3f} (ideal ~0.25 + replicated parts); "
          f"activations with the GELU (and LayerNorm) outputs recomputed / kept: "
          f"{result['activation_bytes_ratio_recompute']:.3f} ({result['activation_bytes_ratio_recompute_ln']:.3f})")
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="llmpi.bench memory") or 0)

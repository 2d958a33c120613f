"""kernels/bias.cu: a linear layer's bias on bf16 activations, where the GEMM writes bf16 and
cannot add it: the add after the GEMM and the bias gradient (column sums, deterministic)."""
import numpy as np

from ..backend import array_module
from .common import MAX_GRID_Y, THREADS, check_f32, grid, i32, launch, storage

BIAS_ROWS = 64  # rows per partial column sum of the bias gradient


def add(out2, bias):
    """out2 (N, OC) bf16 += bias (OC,) float32, in place; -> out2."""
    if storage(out2) != "_bf16":
        raise ValueError("bias.add is for bf16 activations (the float32 ops add their bias themselves)")
    check_f32(bias)
    launch("bias.cu", "bias_add_bf16", grid(out2.size), (THREADS,), out2, bias, np.int64(out2.size),
           i32(bias.size))
    return out2


def grad(d2, db):
    """db (OC,) float32 += the column sums of d2 (N, OC) bf16."""
    if storage(d2) != "_bf16":
        raise ValueError("bias.grad is for bf16 activations")
    check_f32(db)
    N, OC = d2.shape
    rows = max(BIAS_ROWS, -(-N // MAX_GRID_Y))  # the P partials go on grid y
    P = -(-N // rows)
    partial = array_module(d2).empty((P, OC), dtype=np.float32)
    launch("bias.cu", "bias_grad_partial_bf16", (-(-OC // THREADS), P), (THREADS,), partial, d2, i32(N), i32(OC),
           i32(rows))
    launch("bias.cu", "bias_grad_finish", (-(-OC // THREADS),), (THREADS,), db, partial, i32(P), i32(OC))

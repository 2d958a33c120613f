"""kernels/attention.cu: causal attention on CUDA cores in float32, the twin of
llmpi.model.layers.attention; the tensor-core versions (llmpi.gpu.attention_tc) run instead
where the precision asks for them and the head size allows.
"""
import math
import os

import numpy as np

from ..backend import array_module
from . import attention_tc
from .cast import from_bf16, to_bf16
from .common import BF16, MAX_GRID_Y, THREADS, check_f32, i32, launch, storage

WARPS = 8  # query/key rows per block
MAX_HS = 128
# float32 on CUDA cores (attention.cu), or tensor cores in TF32 or bf16 (attention_tc.cu)
PRECISIONS = ("fp32", "tf32", "bf16")


def _dims(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // n_head
    if HS * n_head * 3 != C3 or HS > MAX_HS:
        raise ValueError(f"attention kernel needs 3*NH*HS columns with HS <= {MAX_HS}, "
                         f"got {C3} columns for {n_head} heads")
    if B * n_head > MAX_GRID_Y:  # one (batch, head) per grid row
        raise ValueError(f"attention kernels take at most {MAX_GRID_Y} batch x heads per call, got "
                         f"{B} x {n_head}; use a smaller micro-batch (train.micro_batch)")
    return B, T, C, HS


def tf32_allowed() -> bool:
    """CuPy's switch for TF32 tensor-core matmuls (CUPY_TF32=1); attention follows it."""
    try:  # CuPy's own reading of the variable: any positive integer switches TF32 on
        return int(os.environ.get("CUPY_TF32", "0")) > 0
    except ValueError:
        return False


def tc_possible(qkv, n_head) -> bool:
    """Whether the tensor-core kernels can run this qkv (head size, alignment)."""
    return attention_tc.possible(_dims(qkv, n_head)[3], qkv)


def choose_precision(HS, qkv, requested=None):
    """The precision attention runs in: `requested`, or with None TF32 tensor cores when TF32 is
    allowed and possible, else float32 on CUDA cores."""
    possible = attention_tc.possible(HS, qkv)
    if requested is None:
        return "tf32" if tf32_allowed() and possible else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"attention precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "fp32" and not possible:
        raise ValueError(f"tensor-core attention needs head size in {attention_tc.HEAD_SIZES} and 16-byte "
                         f"aligned qkv, got head size {HS}")
    return requested


def forward(qkv, n_head, precision=None):
    """qkv (B, T, 3C) -> out (B, T, C); cache (qkv, out, lse (B, NH, T), n_head, precision).
    precision: "fp32" | "tf32" | "bf16", or None to follow tf32_allowed(); backward takes the
    forward's (its lse came from those scores)."""
    xp = array_module(qkv)
    check_f32(qkv)
    B, T, C, HS = _dims(qkv, n_head)
    out = xp.empty((B, T, C), dtype=xp.float32)
    lse = xp.empty((B, n_head, T), dtype=xp.float32)
    scale = np.float32(1.0 / math.sqrt(HS))
    precision = choose_precision(HS, qkv, precision)
    if precision != "fp32":
        attention_tc.forward(out, lse, qkv, T, n_head, HS, scale, precision)
    else:
        launch("attention.cu", "attention_forward", (-(-T // WARPS), B * n_head), (WARPS * 32,),
               out, lse, qkv, i32(T), i32(n_head), i32(HS), scale)
    return out, (qkv, out, lse, n_head, precision)


def forward_bf16_where_possible(qkv, n_head):
    """bf16 models take the bf16 tensor-core attention where it has entry points, whatever CUPY_TF32 says."""
    return forward(qkv, n_head, precision="bf16" if tc_possible(qkv, n_head) else "fp32")


def forward_bf16_storage(qkv_b, n_head):
    """bf16 activations: qkv (B, T, 3C) bf16 -> out (B, T, C) bf16. The bf16 tensor-core kernels
    read and write the bf16 arrays as they are where the head size and alignment allow; otherwise
    forward_bf16_where_possible runs on qkv widened to float32 (exact), its output rounded."""
    xp = array_module(qkv_b)
    if storage(qkv_b) != "_bf16":
        raise ValueError(f"forward_bf16_storage takes bf16 (uint16) qkv, got {qkv_b.dtype}")
    B, T, C, HS = _dims(qkv_b, n_head)
    if not attention_tc.possible(HS, qkv_b):
        out, cache = forward_bf16_where_possible(from_bf16(qkv_b), n_head)  # a fresh copy is aligned
        return to_bf16(out), cache
    out = xp.empty((B, T, C), dtype=BF16)
    lse = xp.empty((B, n_head, T), dtype=xp.float32)
    attention_tc.forward(out, lse, qkv_b, T, n_head, HS, np.float32(1.0 / math.sqrt(HS)), "bf16io")
    return out, (qkv_b, out, lse, n_head, "bf16io")


def backward_bf16_storage(dout_b, cache):
    """bf16 activations: dout (B, T, C) bf16 -> dqkv (B, T, 3C) bf16 (of forward_bf16_storage's cache)."""
    qkv_b, out_b, lse, NH, precision = cache
    if precision != "bf16io":
        return to_bf16(backward(from_bf16(dout_b), cache))
    storage(dout_b, qkv_b, out_b)
    B, T, C, HS = _dims(qkv_b, NH)
    dqkv = array_module(dout_b).empty_like(qkv_b)
    attention_tc.backward(dqkv, qkv_b, dout_b, lse, _delta(dout_b, out_b, NH, HS), T, NH, HS,
                          np.float32(1.0 / math.sqrt(HS)), "bf16io")
    return dqkv


def _delta(dout, out, NH, HS):
    """delta (B, NH, T) = rowsum(dout * out) per head (float32 or bf16 arrays): backward's input."""
    xp = array_module(dout)
    suffix = storage(dout, out)
    B, T = dout.shape[:2]
    delta = xp.empty((B, NH, T), dtype=xp.float32)
    rows = B * T * NH
    launch("attention.cu", f"attention_backward_delta{suffix}", (-(-rows // (THREADS // 32)),), (THREADS,),
           delta, dout, out, i32(B), i32(T), i32(NH), i32(HS))
    return delta


def backward(dout, cache):
    """dout (B, T, C) -> dqkv (B, T, 3C)."""
    xp = array_module(dout)
    qkv, out, lse, NH, precision = cache
    check_f32(dout, qkv, out, lse)
    B, T, C, HS = _dims(qkv, NH)
    delta = _delta(dout, out, NH, HS)
    dqkv = xp.empty_like(qkv)
    scale = np.float32(1.0 / math.sqrt(HS))
    if precision != "fp32":
        attention_tc.backward(dqkv, qkv, dout, lse, delta, T, NH, HS, scale, precision)
        return dqkv
    grid = (-(-T // WARPS), B * NH)
    args = (dqkv, qkv, dout, lse, delta, i32(T), i32(NH), i32(HS), scale)
    launch("attention.cu", "attention_backward_dq", grid, (WARPS * 32,), *args)
    launch("attention.cu", "attention_backward_dkv", grid, (WARPS * 32,), *args)
    return dqkv

"""kernels/gradnorm.cu: the global gradient norm (a deterministic sum of squares), the twin of
llmpi.model.layers.gradnorm."""
import math

import numpy as np

from ..backend import array_module
from .common import THREADS, check_f32, i32, launch

NORM_BLOCKS = 1024  # fixed, so the sum of squares has the same bits on every device


def sumsq(x):
    """Sum of squares of a flat float32 buffer as a float64 device scalar (deterministic)."""
    return sumsq_array(x)[0]


def sumsq_array(x):
    """sumsq as a 1-element float64 device array (what clip_factor reads)."""
    xp = array_module(x)
    check_f32(x)
    partial = xp.empty(NORM_BLOCKS, dtype=xp.float64)
    total = xp.empty(1, dtype=xp.float64)
    launch("gradnorm.cu", "sumsq_partial", (NORM_BLOCKS,), (THREADS,), partial, x, i32(x.size))
    launch("gradnorm.cu", "sumsq_finish", (1,), (THREADS,), total, partial, i32(NORM_BLOCKS))
    return total


def clip_factor(grad, max_norm, out):
    """As llmpi.model.layers.gradnorm.clip_factor: the clip's scale into the 1-element float32
    device array `out`, computed on the device from the sum of squares (no host round trip)."""
    check_f32(grad)
    factor_from_sumsq(sumsq_array(grad), max_norm, out)


def factor_from_sumsq(total, max_norm, out):
    """clip_factor's second half: the scale for the norm sqrt(total[0]) (a float64 device array)."""
    check_f32(out)
    if total.dtype != np.float64:
        raise ValueError(f"the sum of squares must be a float64 array, got {total.dtype}")
    launch("gradnorm.cu", "clip_factor", (1,), (32,), out, total, np.float32(max_norm))


def sumsq_float(grad):
    """sumsq as a host float (the op table's `sumsq`)."""
    return float(sumsq(grad))


def clip_grad_norm(grad, max_norm, norm=None):
    """As llmpi.model.layers.gradnorm.clip_grad_norm: scale grad in place to global norm <= max_norm
    (0 disables); returns the norm before clipping (`norm`: the global one, given by the caller)."""
    norm = math.sqrt(float(sumsq(grad))) if norm is None else norm
    if max_norm > 0 and norm > max_norm:
        grad *= np.float32(max_norm / (norm + 1e-6))
    return norm

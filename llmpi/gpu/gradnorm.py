"""kernels/gradnorm.cu: the global gradient norm (a deterministic sum of squares), the twin of
llmpi.model.layers.gradnorm."""
import math

import numpy as np

from ..backend import array_module
from .common import THREADS, check_f32, i32, launch

NORM_BLOCKS = 1024  # fixed, so the sum of squares has the same bits on every device


def sumsq(x):
    """Sum of squares of a flat float32 buffer as a float64 device scalar (deterministic)."""
    xp = array_module(x)
    check_f32(x)
    partial = xp.empty(NORM_BLOCKS, dtype=xp.float64)
    total = xp.empty(1, dtype=xp.float64)
    launch("gradnorm.cu", "sumsq_partial", (NORM_BLOCKS,), (THREADS,), partial, x, i32(x.size))
    launch("gradnorm.cu", "sumsq_finish", (1,), (THREADS,), total, partial, i32(NORM_BLOCKS))
    return total[0]


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

"""AdamW in one pass over the flat p, g, m, v and the decay mask (the NumPy twin takes about ten),
and the gradient norm's sum of squares, accumulated in float64; twins of
llmpi.model.layers.adamw and llmpi.model.layers.gradnorm."""
import math

import numpy as np

from .jit import kernel


@kernel
def _update(p, g, m, v, mask, out, gs, b1, b2, step, inv_sqrt_bc2, eps, decay, apply):
    one = p.dtype.type(1.0)
    for i in range(p.shape[0]):
        gi = g[i] * gs
        mi = b1 * m[i] + (one - b1) * gi
        vi = b2 * v[i] + (one - b2) * gi * gi
        m[i], v[i] = mi, vi
        u = step * mi / (np.sqrt(vi) * inv_sqrt_bc2 + eps) - decay * mask[i] * p[i]
        if apply:
            p[i] += u
        else:
            out[i] = u


@kernel
def _sumsq(g):
    s = 0.0
    for i in range(g.shape[0]):
        gi = np.float64(g[i])
        s += gi * gi
    return s


def update(p, g, m, v, mask, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0, out=None):
    """One AdamW step, as llmpi.model.layers.adamw.update (out=None: p in place)."""
    f = p.dtype.type
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    _update(p, g, m, v, mask, p if out is None else out, f(grad_scale), f(beta1), f(beta2), f(-lr / bc1),
            f(1.0 / math.sqrt(bc2)), f(eps), f(lr * weight_decay), out is None)
    return p if out is None else out


def sumsq(grad):
    """Sum of squares of a flat buffer, as a float."""
    return float(_sumsq(grad))


def clip_grad_norm(grad, max_norm, norm=None):
    """As llmpi.model.layers.gradnorm.clip_grad_norm: scale grad in place to norm <= max_norm."""
    norm = math.sqrt(sumsq(grad)) if norm is None else norm
    if max_norm > 0 and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)  # one ufunc: already a single SIMD pass
    return norm

"""AdamW over flat buffers, the NumPy/CuPy twin of kernels/adamw.cu (llmpi.gpu.adamw).

Decoupled weight decay where `mask` is 1, bias correction with step t (1-based). Written as a
few in-place passes that reuse one temporary, since each NumPy expression is a pass over memory.
"""
import math

from ...backend import array_module


def update(p, g, m, v, mask, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0, out=None):
    """One AdamW step over flat buffers; m, v updated in place. out=None: p is updated in place
    and returned. Otherwise out gets the update u (p_new = p + u) and p is left as it is."""
    xp = array_module(p)
    if grad_scale != 1.0:
        g = g * grad_scale
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    u = g * g
    u *= 1.0 - beta2
    v += u
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    xp.sqrt(v, out=u)
    u *= 1.0 / math.sqrt(bc2)
    u += eps
    xp.divide(m, u, out=u)
    u *= -lr / bc1
    if weight_decay:
        decay = mask * p  # decoupled: uses the weights before this step, like torch AdamW
        decay *= lr * weight_decay
        u -= decay
    if out is None:
        p += u
        return p
    out[...] = u
    return out

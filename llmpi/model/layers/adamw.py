"""AdamW over flat buffers, the NumPy/CuPy twin of kernels/adamw.cu (llmpi.gpu.adamw).

Decoupled weight decay where `mask` is 1, bias correction with step t (1-based). Written as a
few in-place passes that reuse one temporary, since each NumPy expression is a pass over memory.
"""
import math

from ...backend import array_module


def update(p, g, m, v, mask, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0, out=None):
    """One AdamW step over flat buffers; m, v updated in place. out=None: p is updated in place
    and returned. Otherwise out gets the update u (p_new = p + u) and p is left as it is."""
    if grad_scale != 1.0:
        g = g * grad_scale
    return _step(p, g, m, v, mask, lr, 1.0 / math.sqrt(1.0 - beta2 ** t), -lr / (1.0 - beta1 ** t),
                 beta1, beta2, eps, weight_decay, out)


def update_from(p, g, m, v, mask, hyper, beta1, beta2, eps, weight_decay, out=None):
    """update() with the step's scalars read from the array `hyper` = (lr, 1 - beta1^t,
    1 - beta2^t, grad_scale) of p's module and dtype, never from the host: as the kernel reads
    them in a captured step."""
    xp = array_module(p)
    lr, bc1, bc2, grad_scale = hyper[0], hyper[1], hyper[2], hyper[3]
    return _step(p, g * grad_scale, m, v, mask, lr, 1.0 / xp.sqrt(bc2), -lr / bc1, beta1, beta2, eps,
                 weight_decay, out)


def _step(p, g, m, v, mask, lr, inv_sqrt_bc2, step_size, beta1, beta2, eps, weight_decay, out):
    """The passes of one step; step_size = -lr / bc1 (floats or 0-d arrays)."""
    xp = array_module(p)
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    u = g * g
    u *= 1.0 - beta2
    v += u
    xp.sqrt(v, out=u)
    u *= inv_sqrt_bc2
    u += eps
    xp.divide(m, u, out=u)
    u *= step_size
    if weight_decay:
        decay = mask * p  # decoupled: uses the weights before this step, like torch AdamW
        decay *= lr * weight_decay
        u -= decay
    if out is None:
        p += u
        return p
    out[...] = u
    return out

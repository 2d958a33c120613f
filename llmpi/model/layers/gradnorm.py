"""Global gradient-norm clipping over the flat gradient buffer, the NumPy/CuPy twin of
kernels/gradnorm.cu (llmpi.gpu.gradnorm)."""
import math

from ...backend import array_module


def sumsq(grad):
    """Sum of squares of a flat buffer, as a float."""
    return float(grad.dot(grad))


def clip_grad_norm(grad, max_norm, norm=None):
    """Scale the flat `grad` in place so its global L2 norm is at most max_norm (0 disables).
    Returns the norm before clipping, as a float. `norm`: the global norm when `grad` is only a
    part of the model (a pipeline stage's), summed over the parts by the caller."""
    norm = math.sqrt(sumsq(grad)) if norm is None else norm
    if max_norm > 0 and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)
    return norm


def clip_factor(grad, max_norm, out):
    """Write into the 1-element array `out` the factor clip_grad_norm would scale grad by
    (max_norm / (norm + 1e-6) above max_norm, else 1), without a host round trip: the
    optimizer's grad_scale (llmpi.model.layers.adamw.update_from)."""
    xp = array_module(grad)
    norm = xp.sqrt(grad.dot(grad))
    factor = max_norm / (norm + 1e-6)
    out[...] = xp.where(norm > max_norm, factor, 1.0) if max_norm > 0 else 1.0

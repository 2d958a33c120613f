"""Global gradient-norm clipping over the flat gradient buffer, the NumPy/CuPy twin of
kernels/gradnorm.cu (llmpi.gpu.gradnorm)."""
import math


def clip_grad_norm(grad, max_norm):
    """Scale the flat `grad` in place so its global L2 norm is at most max_norm (0 disables).
    Returns the norm before clipping, as a float."""
    norm = math.sqrt(float(grad.dot(grad)))
    if max_norm > 0 and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)
    return norm

"""kernels/adamw.cu: AdamW over the flat buffers in one pass, the twin of llmpi.model.layers.adamw."""
import numpy as np

from .common import THREADS, check_f32, grid, i32, launch


def update(p, g, m, v, mask, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0,
                 out=None):
    """One AdamW step t (1-based) over flat buffers; m, v updated in place.

    out=None: p is updated in place and returned. Otherwise out gets the update u
    (p_new = p + u, llmpi.training.optim.AdamW.delta) and p is left as it is."""
    check_f32(p, g, m, v, mask)
    write_delta = out is not None
    if write_delta:
        check_f32(out)
    else:
        out = p
    launch("adamw.cu", "adamw_update", grid(p.size), (THREADS,), out, p, g, m, v, mask,
           i32(p.size), np.float32(lr), np.float32(beta1), np.float32(beta2), np.float32(eps),
           np.float32(weight_decay), np.float32(1.0 - beta1 ** t), np.float32(1.0 - beta2 ** t),
           np.float32(grad_scale), np.int32(write_delta))
    return out


def update_from(p, g, m, v, mask, hyper, beta1, beta2, eps, weight_decay, out=None):
    """update() with (lr, 1 - beta1^t, 1 - beta2^t, grad_scale) read from the float32 device array
    `hyper` by the kernel: a captured step's scalars change between replays (kernels/adamw.cu)."""
    check_f32(p, g, m, v, mask, hyper)
    write_delta = out is not None
    if write_delta:
        check_f32(out)
    else:
        out = p
    launch("adamw.cu", "adamw_update_from", grid(p.size), (THREADS,), out, p, g, m, v, mask, i32(p.size), hyper,
           np.float32(beta1), np.float32(beta2), np.float32(eps), np.float32(weight_decay), np.int32(write_delta))
    return out

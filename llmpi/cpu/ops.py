"""FUSED_OPS: the op table of the fused CPU kernels, with exactly the entries of
llmpi.model.ops.LAYER_OPS (see there). The embedding, the residual add (one ufunc each), the
matmuls (BLAS) and the step with its scalars in an array (adamw_update_from, clip_factor: used by
captured GPU steps, here only to check them) are the NumPy layers' own; everything else is a Numba kernel of this package.
"""
import time
from types import SimpleNamespace

import numpy as np

from ..model.layers import adamw as layer_adamw, embedding, gradnorm, linear, lm_head, residual
from ..model.ops import describe_precision, residual_then_layernorm, unchanged
from . import adamw, attention, crossentropy, gelu, layernorm

FUSED_OPS = SimpleNamespace(
    embedding=embedding, layernorm=layernorm, residual=residual, attention=attention,
    bias_gelu=SimpleNamespace(forward=gelu.bias_forward, backward=gelu.backward, recompute=gelu.recompute),
    crossentropy=crossentropy, linear=linear, lm_head=lm_head, project=linear.project,
    adamw_update=adamw.update, clip_grad_norm=adamw.clip_grad_norm, sumsq=adamw.sumsq,
    adamw_update_from=layer_adamw.update_from, clip_factor=gradnorm.clip_factor,
    linear_input=unchanged, weights=linear.Weights, precision=describe_precision,
    residual_layernorm=residual_then_layernorm(residual, layernorm), activation_dtype=None, widen=unchanged)

KERNELS = (gelu._bias_forward, gelu._forward, gelu._backward, layernorm._forward, layernorm._recompute,
           layernorm._backward, attention._softmax, attention._softmax_backward, crossentropy._forward,
           crossentropy._backward, adamw._update, adamw._sumsq)


def warm(dtype):
    """Compile (or load from Numba's cache) every kernel for `dtype` on tiny inputs.
    -> seconds spent compiling, 0.0 when everything came from the cache."""
    misses = sum(sum(k.stats.cache_misses.values()) for k in KERNELS)
    t0 = time.perf_counter()
    r = np.random.default_rng(0)
    B, T, C, NH, V = 1, 3, 4, 2, 5
    f = lambda *shape: r.standard_normal(shape).astype(dtype)  # noqa: E731
    out, cache = gelu.bias_forward(f(B, T, 4 * C), f(4 * C))
    gelu.backward(out, cache)
    gelu.recompute(cache)
    w, dw, db = f(C), f(C), f(C)
    out, cache = layernorm.forward(f(B, T, C), w, f(C))
    layernorm.backward(out, cache, dw, db)
    layernorm.backward(out, cache, dw, db, dx=f(B, T, C))
    layernorm.recompute(cache, db)
    out, cache = attention.forward(f(B, T, 3 * C), NH)
    attention.backward(out, cache)
    _, cache = crossentropy.forward(f(B, T, V), np.zeros((B, T), np.int64))
    crossentropy.backward(cache)
    p = f(7)
    adamw.update(p, f(7), f(7), np.abs(f(7)), np.ones(7, dtype), 1e-3, 0.9, 0.99, 1e-8, 0.1, 1)
    adamw.update(p, f(7), f(7), np.abs(f(7)), np.ones(7, dtype), 1e-3, 0.9, 0.99, 1e-8, 0.1, 1, out=f(7))
    adamw.sumsq(p)
    compiled = sum(sum(k.stats.cache_misses.values()) for k in KERNELS) > misses
    return time.perf_counter() - t0 if compiled else 0.0

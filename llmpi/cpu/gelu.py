"""GELU (tanh form) with the c_fc bias add, forward and backward, one pass each; the twin of
llmpi.model.layers.gelu (same cache: the pre-activation).

With u = x (k + k a x^2), 0.5 x (1 + tanh u) = x s where s = 1 / (1 + e^(-2u)), and
1 - tanh^2 u = 4 s (1 - s) with 1 - s = e^(-2u) s: one exp and one division per element, and no
1 + tanh u, which for x below about -3 cancels to noise in float32. e^(-2u) is capped at e^80
(finite in float32: s then underflows to ~0 and e s stays ~1 instead of inf x 0)."""
import math

import numpy as np

from .jit import exp, kernel

K = math.sqrt(2.0 / math.pi)
A = 0.044715


@kernel
def _bias_forward(pre, bias, out):
    """pre (N, OC) += bias, out = gelu(pre)."""
    one, cap = pre.dtype.type(1.0), pre.dtype.type(80.0)
    k2, ka2 = pre.dtype.type(-2 * K), pre.dtype.type(-2 * K * A)
    for i in range(pre.shape[0]):
        for j in range(pre.shape[1]):
            x = pre[i, j] + bias[j]
            pre[i, j] = x
            out[i, j] = x / (one + exp(min(x * (k2 + ka2 * x * x), cap)))


@kernel
def _forward(x, out):
    """out = gelu(x) over flat arrays, as _bias_forward computes it."""
    one, cap = x.dtype.type(1.0), x.dtype.type(80.0)
    k2, ka2 = x.dtype.type(-2 * K), x.dtype.type(-2 * K * A)
    for i in range(x.shape[0]):
        xi = x[i]
        out[i] = xi / (one + exp(min(xi * (k2 + ka2 * xi * xi), cap)))


@kernel
def _backward(dout, x, dx):
    """dx = dout * gelu'(x) over flat arrays: s + 2 x u' s (1 - s)."""
    one, two, cap = x.dtype.type(1.0), x.dtype.type(2.0), x.dtype.type(80.0)
    k2, ka2, k, ka3 = x.dtype.type(-2 * K), x.dtype.type(-2 * K * A), x.dtype.type(K), x.dtype.type(3 * K * A)
    for i in range(x.shape[0]):
        xi = x[i]
        x2 = xi * xi
        e = exp(min(xi * (k2 + ka2 * x2), cap))
        s = one / (one + e)
        dx[i] = dout[i] * (s + two * xi * (k + ka3 * x2) * s * (e * s))


def bias_forward(pre, bias):
    """pre (B, T, OC) += bias in place -> (gelu(pre) (B, T, OC), cache pre)."""
    out = np.empty_like(pre)
    _bias_forward(pre.reshape(-1, pre.shape[-1]), bias, out.reshape(-1, pre.shape[-1]))
    return out, pre


def recompute(cache):
    """bias_forward's output again from its cache, the pre-activation (model.recompute = "gelu")."""
    out = np.empty_like(cache)
    _forward(cache.reshape(-1), out.reshape(-1))
    return out


def backward(dout, cache):
    """dout (B, T, OC) -> dpre (B, T, OC)."""
    dx = np.empty_like(cache)
    _backward(np.ascontiguousarray(dout).reshape(-1), cache.reshape(-1), dx.reshape(-1))
    return dx

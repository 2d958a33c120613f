"""GELU (tanh form) with the c_fc bias add, forward and backward, one pass each; the twin of
llmpi.model.layers.gelu (same cache: the pre-activation)."""
import math

import numpy as np

from .jit import kernel, tanh

K = math.sqrt(2.0 / math.pi)
A = 0.044715


@kernel
def _bias_forward(pre, bias, out):
    """pre (N, OC) += bias, out = gelu(pre)."""
    one = pre.dtype.type(1.0)
    half, k, ka = pre.dtype.type(0.5), pre.dtype.type(K), pre.dtype.type(K * A)
    for i in range(pre.shape[0]):
        for j in range(pre.shape[1]):
            x = pre[i, j] + bias[j]
            pre[i, j] = x
            out[i, j] = half * x * (one + tanh(x * (k + ka * x * x)))


@kernel
def _backward(dout, x, dx):
    """dx = dout * gelu'(x) over flat arrays."""
    one = x.dtype.type(1.0)
    half, k, ka, ka3 = x.dtype.type(0.5), x.dtype.type(K), x.dtype.type(K * A), x.dtype.type(3 * K * A)
    for i in range(x.shape[0]):
        xi = x[i]
        x2 = xi * xi
        th = tanh(xi * (k + ka * x2))
        dx[i] = dout[i] * (half * (one + th) + half * xi * (one - th * th) * (k + ka3 * x2))


def bias_forward(pre, bias):
    """pre (B, T, OC) += bias in place -> (gelu(pre) (B, T, OC), cache pre)."""
    out = np.empty_like(pre)
    _bias_forward(pre.reshape(-1, pre.shape[-1]), bias, out.reshape(-1, pre.shape[-1]))
    return out, pre


def backward(dout, cache):
    """dout (B, T, OC) -> dpre (B, T, OC)."""
    dx = np.empty_like(cache)
    _backward(np.ascontiguousarray(dout).reshape(-1), cache.reshape(-1), dx.reshape(-1))
    return dx

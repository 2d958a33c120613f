"""LayerNorm over the last axis with its statistics in the same pass over each row, and the
backward with its weight and bias gradients and the residual add (dx +=); the twin of
llmpi.model.layers.layernorm (cache: x, w and the rows' mean and rstd)."""
import numpy as np

from .jit import kernel

EPS = 1e-5


@kernel
def _forward(x, w, b, out, mean, rstd):
    """x (N, C) -> out (N, C), mean (N,), rstd (N,)."""
    N, C = x.shape
    inv_c, eps, one = x.dtype.type(1.0 / C), x.dtype.type(EPS), x.dtype.type(1.0)
    for i in range(N):
        s = x.dtype.type(0.0)
        for j in range(C):
            s += x[i, j]
        m = s * inv_c
        v = x.dtype.type(0.0)
        for j in range(C):
            d = x[i, j] - m
            v += d * d
        r = one / np.sqrt(v * inv_c + eps)
        mean[i], rstd[i] = m, r
        for j in range(C):
            out[i, j] = (x[i, j] - m) * r * w[j] + b[j]


@kernel
def _recompute(x, w, b, mean, rstd, out):
    """out (N, C) from x (N, C) and the rows' statistics, as _forward writes it."""
    N, C = x.shape
    for i in range(N):
        m, r = mean[i], rstd[i]
        for j in range(C):
            out[i, j] = (x[i, j] - m) * r * w[j] + b[j]


@kernel
def _backward(dout, x, w, mean, rstd, dw, db, dx, accumulate):
    """dx (N, C) = (or += with accumulate) the input gradient; dw, db (C,) += their gradients."""
    N, C = x.shape
    inv_c = x.dtype.type(1.0 / C)
    for i in range(N):
        m, r = mean[i], rstd[i]
        s1 = x.dtype.type(0.0)
        s2 = x.dtype.type(0.0)
        for j in range(C):
            xhat = (x[i, j] - m) * r
            g = dout[i, j]
            db[j] += g
            dw[j] += g * xhat
            dxhat = g * w[j]
            s1 += dxhat
            s2 += dxhat * xhat
        s1 *= inv_c
        s2 *= inv_c
        for j in range(C):
            xhat = (x[i, j] - m) * r
            d = r * (dout[i, j] * w[j] - s1 - xhat * s2)
            if accumulate:
                dx[i, j] += d
            else:
                dx[i, j] = d


def forward(x, w, b):
    """x (B, T, C), w (C,), b (C,) -> out (B, T, C); cache (x, w, mean, rstd)."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)
    out = np.empty_like(x2)
    mean = np.empty(x2.shape[0], x.dtype)
    rstd = np.empty(x2.shape[0], x.dtype)
    _forward(x2, w, b, out, mean, rstd)
    return out.reshape(x.shape), (x2, w, mean, rstd)


def recompute(cache, b):
    """forward's output again from its cache and the bias b (model.recompute = "gelu+ln")."""
    x2, w, mean, rstd = cache
    out = np.empty_like(x2)
    _recompute(x2, w, b, mean, rstd, out)
    return out


def backward(dout, cache, dw, db, dx=None):
    """dout (B, T, C) -> dx (B, T, C); adds into dw, db (C,); with `dx` given the input gradient
    is added into it (the residual stream) and it is returned."""
    x2, w, mean, rstd = cache
    d2 = np.ascontiguousarray(dout).reshape(x2.shape)
    if dx is None:
        out = np.empty(dout.shape, dout.dtype)
        _backward(d2, x2, w, mean, rstd, dw, db, out.reshape(x2.shape), False)
        return out
    if not dx.flags.c_contiguous:
        dx += backward(dout, cache, dw, db)
        return dx
    _backward(d2, x2, w, mean, rstd, dw, db, dx.reshape(x2.shape), True)
    return dx

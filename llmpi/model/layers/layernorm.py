"""LayerNorm over the last axis (llm.c doc/layernorm): keep mean and rstd, recompute xhat."""
from ...backend import array_module

EPS = 1e-5


def forward(x, w, b):
    """x (B, T, C), w (C,), b (C,) -> out (B, T, C); cache (x, w, mean, rstd)."""
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)  # (B, T, 1)
    xc = x - mean
    var = xp.mean(xc * xc, axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + EPS)  # (B, T, 1)
    xc *= rstd  # xhat
    xc *= w
    xc += b
    return xc, (x, w, mean, rstd)


def recompute(cache, b):
    """forward's output again from its cache and the bias b, the same bits (model.recompute =
    "gelu+ln": backward rebuilds the output instead of keeping it)."""
    x, w, mean, rstd = cache
    xc = x - mean
    xc *= rstd
    xc *= w
    xc += b
    return xc


def backward(dout, cache, dw, db, dx=None):
    """dout (B, T, C) -> dx (B, T, C); adds into dw, db (C,). With `dx` given the input
    gradient is added into it (the residual stream) and it is returned."""
    x, w, mean, rstd = cache
    C = x.shape[-1]
    xhat = x - mean
    xhat *= rstd
    dout2 = dout.reshape(-1, C)
    db += dout2.sum(axis=0)
    dw += (dout * xhat).reshape(-1, C).sum(axis=0)
    dxhat = dout * w
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    proj = (dxhat * xhat).mean(axis=-1, keepdims=True)
    xhat *= proj
    dxhat -= dxhat.mean(axis=-1, keepdims=True)
    dxhat -= xhat
    dxhat *= rstd
    if dx is None:
        return dxhat
    dx += dxhat
    return dx

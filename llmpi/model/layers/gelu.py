"""GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
import math

from ...backend import array_module

K = math.sqrt(2.0 / math.pi)
A = 0.044715


def forward(x):
    """x (B, T, 4C) -> out (B, T, 4C); cache x (tanh is recomputed in backward to save memory)."""
    xp = array_module(x)
    u = x * x
    u *= A * K
    u += K
    u *= x  # K (x + A x^3)
    xp.tanh(u, out=u)
    u += 1.0
    u *= x
    u *= 0.5
    return u, x


def bias_forward(pre, bias):
    """pre (B, T, OC) += bias (OC) in place, then -> (gelu(pre), cache pre): a matmul's bias add
    fused with the activation (the CUDA kernel does both in one pass)."""
    pre += bias
    return forward(pre)


def recompute(cache):
    """bias_forward's output again from its cache, the same bits (model.recompute = "gelu": backward
    rebuilds the activation instead of keeping it)."""
    return forward(cache)[0]


def backward(dout, cache):
    """dout (B, T, 4C) -> dx (B, T, 4C)."""
    xp = array_module(dout)
    x = cache
    x2 = x * x
    th = x2 * (A * K)
    th += K
    th *= x
    xp.tanh(th, out=th)
    # d/dx = 0.5 (1 + th) + 0.5 x (1 - th^2) K (1 + 3 A x^2)
    x2 *= 3 * A * K
    x2 += K
    x2 *= x
    sech2 = th * th
    sech2 -= 1.0
    sech2 *= x2  # -(1 - th^2) * K x (1 + 3 A x^2)
    th += 1.0
    th -= sech2
    th *= 0.5
    th *= dout
    return th

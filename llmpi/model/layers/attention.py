"""Causal multi-head self-attention on a fused qkv input (llm.c attention_forward).

All heads and time steps are batched through matmul on (B, NH, T, HS) views of
qkv; no Python loop over heads or time. Only qkv and the softmax probabilities
are kept for backward.
"""
import math

import numpy as np

from ...backend import array_module

_MASKS = {}


def _causal_mask(xp, T, dtype):
    """(T, T) additive mask: 0 on and below the diagonal, -inf above (memoized)."""
    key = (xp.__name__, T, np.dtype(dtype).str)
    if key not in _MASKS:
        m = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
        _MASKS[key] = xp.asarray(m)
    return _MASKS[key]


def _heads(qkv, NH):
    """qkv (B, T, 3C) -> q, k, v each (B, NH, T, HS) as strided views (no copy)."""
    B, T, C3 = qkv.shape
    HS = C3 // (3 * NH)
    qkv5 = qkv.reshape(B, T, 3, NH, HS)
    return (qkv5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def causal_softmax(att, scale):
    """att (B, NH, T, T) raw scores -> causal softmax of scale * scores, in place."""
    xp = array_module(att)
    att *= scale
    att += _causal_mask(xp, att.shape[-1], att.dtype)
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att *= 1.0 / att.sum(axis=-1, keepdims=True)


def causal_softmax_backward(datt, att, scale):
    """datt (B, NH, T, T) = dL/dprobs -> dL/dscores (times scale), in place: att * (datt -
    sum(datt * att)); masked entries have att = 0."""
    datt -= (datt * att).sum(axis=-1, keepdims=True)
    datt *= att
    datt *= scale


def forward(qkv, n_head, softmax=causal_softmax):
    """qkv (B, T, 3C) -> out (B, T, C); cache (qkv, att, n_head) with att (B, NH, T, T).
    `softmax(att, scale)` in place (llmpi.cpu.attention passes its one-pass kernel)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = _heads(qkv, n_head)
    att = q @ k.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    softmax(att, att.dtype.type(1.0 / math.sqrt(C // n_head)))
    y = att @ v  # (B, NH, T, HS)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C) copy into token-major order
    return out, (qkv, att, n_head)


def backward(dout, cache, softmax_backward=causal_softmax_backward):
    """dout (B, T, C) -> dqkv (B, T, 3C)."""
    xp = array_module(dout)
    qkv, att, NH = cache
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // NH
    q, k, v = _heads(qkv, NH)
    dy = dout.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS)
    dqkv = xp.empty_like(qkv)
    d5 = dqkv.reshape(B, T, 3, NH, HS)
    d5[:, :, 2] = (att.transpose(0, 1, 3, 2) @ dy).transpose(0, 2, 1, 3)  # dv
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    softmax_backward(datt, att, att.dtype.type(1.0 / math.sqrt(HS)))
    d5[:, :, 0] = (datt @ k).transpose(0, 2, 1, 3)  # dq
    d5[:, :, 1] = (datt.transpose(0, 1, 3, 2) @ q).transpose(0, 2, 1, 3)  # dk
    return dqkv

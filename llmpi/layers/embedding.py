"""Token + position embedding: out[b, t] = wte[idx[b, t]] + wpe[t]."""
import numpy as np

from ..backend import array_module


def forward(wte, wpe, idx):
    """wte (V, C), wpe (maxT, C), idx (B, T) int -> out (B, T, C)."""
    T = idx.shape[1]
    out = wte[idx]  # (B, T, C) gather makes a fresh array
    out += wpe[:T]
    return out, idx


def backward(dout, cache, dwte, dwpe):
    """dout (B, T, C); adds into dwte (V, C) and dwpe (maxT, C). Returns None (no input grad)."""
    xp = array_module(dout)
    idx = cache
    B, T, C = dout.shape
    dout2 = dout.reshape(B * T, C)
    dwpe[:T] += dout.sum(axis=0)
    # scatter-add: repeated tokens must accumulate, which fancy-index += would not do
    flat = idx.reshape(-1)
    if xp is np:  # sum equal-token rows with one sorted reduceat (several times faster than add.at)
        order = np.argsort(flat, kind="stable")
        tokens = flat[order]
        starts = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]])
        dwte[tokens[starts]] += np.add.reduceat(dout2[order], starts, axis=0)
    else:
        xp.add.at(dwte, flat, dout2)
    return None

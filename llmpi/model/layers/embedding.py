"""Token + position embedding: out[b, t] = wte[idx[b, t]] + wpe[t]."""
from ...backend import scatter_add_rows


def forward(wte, wpe, idx):
    """wte (V, C), wpe (maxT, C), idx (B, T) int -> out (B, T, C)."""
    T = idx.shape[1]
    out = wte[idx]  # (B, T, C) gather makes a fresh array
    out += wpe[:T]
    return out, idx


def backward(dout, cache, dwte, dwpe):
    """dout (B, T, C); adds into dwte (V, C) and dwpe (maxT, C). Returns None (no input grad)."""
    idx = cache
    B, T, C = dout.shape
    dout2 = dout.reshape(B * T, C)
    dwpe[:T] += dout.sum(axis=0)
    scatter_add_rows(dwte, idx.reshape(-1), dout2)  # repeated tokens accumulate
    return None

"""Causal self-attention on the fused qkv: the small batched products stay in BLAS (NumPy's
matmul over (B, NH, T, HS) views of qkv, as the twin llmpi.model.layers.attention), while the
scale, the causal mask and the softmax are one pass per row of scores in place, and so is the
softmax backward (the twin takes about eight passes over (B, NH, T, T) with two temporaries).
A first version that computed the products in Numba too (only the causal half, no transposed
copies) was 2-4x slower than BLAS on these shapes: its inner dot products of HS did not
vectorize. Cache: qkv, the probabilities, n_head."""
import numpy as np

from ..model.layers import attention as layer
from .jit import exp, kernel


@kernel
def _softmax(att, scale):
    """att (B, NH, T, T) raw scores -> causal softmax of scale * scores, in place (0 above the diagonal)."""
    B, NH, T, _ = att.shape
    zero = att.dtype.type(0.0)
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                row = att[b, h, t]
                peak = att.dtype.type(-np.inf)  # a float -inf would make the row float64 (libm exp)
                for s in range(t + 1):
                    peak = max(peak, row[s] * scale)
                total = zero
                for s in range(t + 1):
                    e = exp(row[s] * scale - peak)
                    row[s] = e
                    total += e
                inv = att.dtype.type(1.0) / total
                for s in range(t + 1):
                    row[s] *= inv
                for s in range(t + 1, T):
                    row[s] = zero


@kernel
def _softmax_backward(datt, att, scale):
    """datt (B, NH, T, T) = dL/dprobs -> dL/dscores (times scale), in place."""
    B, NH, T, _ = att.shape
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                d, p = datt[b, h, t], att[b, h, t]
                dot = att.dtype.type(0.0)
                for s in range(t + 1):
                    dot += d[s] * p[s]
                for s in range(T):
                    d[s] = p[s] * (d[s] - dot) * scale


def forward(qkv, n_head):
    """qkv (B, T, 3C) -> out (B, T, C); cache (qkv, att (B, NH, T, T), n_head)."""
    return layer.forward(qkv, n_head, _softmax)


def backward(dout, cache):
    """dout (B, T, C) -> dqkv (B, T, 3C)."""
    return layer.backward(dout, cache, _softmax_backward)

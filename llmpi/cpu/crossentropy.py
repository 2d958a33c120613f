"""Softmax cross-entropy and its gradient, one pass per row of logits, in place (the probabilities
overwrite the logits, as in llmpi.model.layers.crossentropy, whose cache this one mirrors)."""
import numpy as np

from .jit import exp, kernel


@kernel
def _forward(z, t):
    """z (N, V) -> probabilities in place; returns the summed -log p_t (float64)."""
    N, V = z.shape
    loss = 0.0
    for i in range(N):
        peak = z[i, 0]
        for j in range(V):
            peak = max(peak, z[i, j])
        zt = z[i, t[i]] - peak
        total = z.dtype.type(0.0)
        for j in range(V):
            e = exp(z[i, j] - peak)
            z[i, j] = e
            total += e
        inv = z.dtype.type(1.0) / total
        for j in range(V):
            z[i, j] *= inv
        loss += np.log(np.float64(total)) - np.float64(zt)
    return loss


@kernel
def _backward(probs, t, scale):
    for i in range(probs.shape[0]):
        probs[i, t[i]] -= probs.dtype.type(1.0)
        for j in range(probs.shape[1]):
            probs[i, j] *= scale


def forward(logits, targets):
    """logits (B, T, V), targets (B, T) int -> (mean loss, cache); the logits become the probabilities."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # a view: the head's (possibly wider) buffer keeps its rows
    t = np.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
    loss = _forward(z, t) / z.shape[0]
    return loss, (z, t, logits.shape)


def loss(logits, targets):
    """Mean token loss without keeping anything for backward (evaluation)."""
    return forward(logits, targets)[0]


def backward(cache, loss_scale=1.0):
    """-> dlogits (B, T, V) = loss_scale * (probs - onehot) / (B*T), in place on the probabilities."""
    probs, t, shape = cache
    _backward(probs, t, probs.dtype.type(loss_scale / probs.shape[0]))
    return probs.reshape(shape)

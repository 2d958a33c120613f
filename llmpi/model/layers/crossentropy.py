"""Softmax cross-entropy, mean over the B*T tokens, computed in place on the logits."""
from ...backend import array_module


def forward(logits, targets):
    """logits (B, T, V), targets (B, T) int -> (loss float, cache).

    The logits buffer is overwritten with the probabilities (no second (B, T, V)
    copy is kept); the caller must not use it afterwards.
    """
    xp = array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (BT, V)
    t = targets.reshape(-1)
    rows = xp.arange(z.shape[0])
    z -= z.max(axis=-1, keepdims=True)  # stable: exp of values <= 0
    zt = z[rows, t].copy()  # shifted target logits, before exp overwrites z
    xp.exp(z, out=z)
    s = z.sum(axis=-1, keepdims=True)
    z /= s
    # -log p_t = log(sum exp) - z_t; summed in float64 so large batches do not lose digits
    loss = float((xp.log(s[:, 0]) - zt).sum(dtype=xp.float64)) / z.shape[0]
    return loss, (z, t, rows, logits.shape)


def loss(logits, targets):
    """Mean token loss (float) without keeping anything for backward (evaluation); the logits
    buffer is overwritten."""
    return forward(logits, targets)[0]


def backward(cache, loss_scale=1.0):
    """-> dlogits (B, T, V) = loss_scale * (probs - onehot) / (B*T), in place on the probabilities
    (the cache is consumed)."""
    probs, t, rows, shape = cache
    probs[rows, t] -= 1.0
    probs *= loss_scale / probs.shape[0]
    return probs.reshape(shape)

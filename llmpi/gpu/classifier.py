"""kernels/classifier.cu: softmax cross-entropy fused into one pass over the logits, the twin of
llmpi.model.layers.crossentropy; float32 or bf16 (uint16) logits, dlogits left in the same dtype."""
import numpy as np

from ..backend import array_module
from .common import BF16, i32, launch


def _row_stride(a):
    """Elements between consecutive rows (over all leading axes) of an array whose last axis is
    contiguous, such as the first V columns of a padded (N, Vp) buffer."""
    item = a.dtype.itemsize
    if a.ndim < 2 or a.strides[-1] != item:
        raise ValueError(f"the classifier needs rows with a contiguous last axis, got strides {a.strides}")
    # axes of length 1 take no step, and their strides mean nothing (NumPy and CuPy may give any)
    lead = [(n, st) for n, st in zip(a.shape[:-1], a.strides[:-1]) if n > 1]
    for (_, outer), (n, inner) in zip(lead, lead[1:]):
        if outer != inner * n:
            raise ValueError(f"the classifier needs evenly spaced rows, got strides {a.strides}")
    return (lead[-1][1] if lead else a.shape[-1] * item) // item


def _crossentropy(logits, targets, write_grad):
    """Per-token losses (N,) of the fused kernel; write_grad leaves dlogits (loss_scale 1) in
    the logits buffer. logits may be the first V columns of wider rows (a padded buffer)."""
    xp = array_module(logits)
    if logits.dtype not in (np.float32, BF16):
        raise ValueError(f"the classifier needs float32 or bf16 (uint16) logits, got {logits.dtype} {logits.shape}")
    stride = _row_stride(logits)
    V = logits.shape[-1]
    N = logits.size // V
    t32 = xp.ascontiguousarray(targets.reshape(-1), dtype=xp.int32)
    losses = xp.empty(N, dtype=xp.float32)
    threads = min(1024, -(-V // 32) * 32)
    name = "crossentropy_fused_bf16" if logits.dtype == BF16 else "crossentropy_fused"
    launch("classifier.cu", name, (N,), (threads,), logits, losses, t32,
           i32(N), i32(V), np.int64(stride), np.float32(1.0 / N), np.int32(write_grad))
    return losses


def forward(logits, targets):
    """logits (B, T, V), targets (B, T) int -> (mean loss, cache); the loss is a 0-d float64 array
    on the device, so a step reads it (float()) only where it needs a number and a captured step
    can keep it (llmpi.training.graphed).

    One fused pass leaves dlogits for loss_scale = 1 in the logits buffer (as the NumPy layer
    leaves the probabilities there); the caller must not use the logits afterwards."""
    losses = _crossentropy(logits, targets, 1)
    return losses.sum(dtype=array_module(logits).float64) / losses.size, logits


def losses(logits, targets):
    """Per-token losses (N,) without touching the logits (evaluation)."""
    return _crossentropy(logits, targets, 0)


def loss(logits, targets):
    """Mean token loss (float) without touching the logits (evaluation)."""
    per_token = losses(logits, targets)
    return float(per_token.sum(dtype=array_module(logits).float64)) / per_token.size


def backward(cache, loss_scale=1.0):
    """-> dlogits (B, T, V) = loss_scale * (probs - onehot) / N, in place (cache consumed)."""
    dlogits = cache
    if loss_scale != 1.0 and dlogits.dtype == BF16:
        V = dlogits.shape[-1]
        launch("classifier.cu", "scale_rows_bf16", (dlogits.size // V,), (min(1024, -(-V // 32) * 32),), dlogits,
               i32(dlogits.size // V), i32(V), np.int64(_row_stride(dlogits)), np.float32(loss_scale))
    elif loss_scale != 1.0:
        dlogits *= np.float32(loss_scale)
    return dlogits

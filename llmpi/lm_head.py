"""The LM head (logits = xf @ wte^T, the embedding matrix reused) and its GPU row padding.

On the GPU the head reads wte with zero rows appended up to padded_vocab(V) columns of logits:
GPT-2's 50257 would leave every logits row misaligned, which sends cuBLAS to slower kernels.
The logits are then the first V columns of the (N, Vp) output; the classifier kernel reads and
writes only those (its rows are strided), so the padding columns stay zero and add nothing to
the gradients. The backward takes dlogits in the same buffer, where the classifier left them.
"""
from .gpu_ops import address

VOCAB_PAD = 64  # columns: 256-byte float32 rows, 128-byte bf16 rows


def padded_vocab(V):
    return -(-V // VOCAB_PAD) * VOCAB_PAD


def full_rows(d2, cache):
    """The head's whole output buffer (N, Vp), given dlogits d2 = its first V columns."""
    full = cache[-1]
    if address(full) != address(d2) or d2.shape[0] != full.shape[0]:
        raise ValueError("the LM head's backward needs dlogits in the forward's logits buffer")
    return full


def forward(xf2, wte):
    """xf2 (N, C) @ wte^T -> (N, rows of wte) and the cache for backward."""
    full = xf2 @ wte.T
    return full, (xf2, wte, full)


def backward(d2, cache, dwte):
    """d2 (N, V) dlogits -> dx (N, C); adds d2^T @ xf2 into dwte (V, C)."""
    xf2, wte = cache[:2]
    full = full_rows(d2, cache)
    dwte += (full.T @ xf2)[:dwte.shape[0]]
    return full @ wte

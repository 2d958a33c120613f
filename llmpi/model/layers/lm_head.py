"""The LM head: logits = xf @ wte^T, the embedding matrix reused (GPT-2's tied head).

The head may read wte with zero rows appended (the GPU pads the vocabulary, llmpi.gpu.lm_head):
the logits are then the first V columns of the (N, Vp) output, and the backward takes dlogits
in the same buffer, where the classifier left them; the padding columns stay zero and add
nothing to the gradients.
"""
from ...backend import address


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

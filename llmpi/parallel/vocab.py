"""Vocab-parallel embedding, LM head and cross-entropy: rank k of a tensor group holds rows
[k Vk, (k+1) Vk) of wte (Vk = ceil(V / K); the rows past V are zero padding that no token reads
and whose logits are masked), so neither wte nor the (B, T, V) logits exist whole on any rank.

Embedding: each rank looks up the tokens of its rows (zeros for the others), one all-reduce of
(B, T, C) makes x whole, then wpe (replicated) is added; backward needs no communication (the
incoming gradient is already whole).
Head: logits_k = ln_f(x) @ wte_k^T (N, Vk); the cross-entropy over all V columns takes three
all-reduces of N numbers (the row max, the target logit, the sum of exponentials), and its
backward one of dx (N, C): each rank's dlogits_k @ wte_k is a partial sum over the vocabulary.
The stages have the interface of llmpi.model.stages' Embedding and Head.

Shape legend: B batch, T time, C n_embd, N = B*T tokens, V vocab_size, Vk rows per rank.
"""
from ..backend import array_module, scatter_add_rows


class VocabEmbedding:
    """idx (B, T) int -> x (B, T, C) = wte[idx] + wpe[:T], wte split by rows over the group."""

    def __init__(self, params, group):
        self.group = group
        self.wte, self.wpe = params.views["wte"], params.views["wpe"]
        self.dwte, self.dwpe = params.grad_views["wte"], params.grad_views["wpe"]
        self.lo = group.k * self.wte.shape[0]  # the first vocabulary row this rank holds

    def forward(self, idx):
        xp = array_module(self.wte)
        local, inside = _local(xp, idx, self.lo, self.wte.shape[0])
        x = self.wte[local]  # (B, T, C), a fresh array
        x *= inside[..., None]
        self.group.sum(x)
        x += self.wpe[:idx.shape[1]]
        return x, (local, inside)

    def backward(self, dx, cache):
        local, inside = cache
        B, T, C = dx.shape
        self.dwpe[:T] += dx.sum(axis=0)
        rows = dx * inside[..., None]  # (B, T, C): the other ranks' tokens add nothing here
        scatter_add_rows(self.dwte, local.reshape(-1), rows.reshape(B * T, C))


class VocabHead:
    """x (B, T, C) -> ln_f -> logits_k (B, T, Vk) = . @ wte_k^T, and the mean token loss over the
    whole vocabulary."""

    def __init__(self, params, ops, group, vocab_size):
        self.ops, self.group, self.vocab_size = ops, group, vocab_size
        self.ln_w, self.ln_b = params.views["ln_f.weight"], params.views["ln_f.bias"]
        self.dln_w, self.dln_b = params.grad_views["ln_f.weight"], params.grad_views["ln_f.bias"]
        self.dwte = params.grad_views["wte"]
        self.rows = self.dwte.shape[0]
        self.lo = group.k * self.rows
        self.valid = max(0, min(self.rows, vocab_size - self.lo))  # this rank's rows below V

    def forward(self, x, head_weight, targets=None):
        """-> (this rank's logits or None, loss or None, cache), as Head.forward."""
        B, T, _ = x.shape
        xf, c_lnf = self.ops.layernorm.forward(x, self.ln_w, self.ln_b)  # (B, T, C)
        full, c_head = self.ops.lm_head.forward(xf.reshape(B * T, -1), head_weight)  # (N, >= Vk)
        logits = full[:, :self.rows]  # (N, Vk)
        logits[:, self.valid:] = -float("inf")  # padding rows are no tokens
        cache = {"lnf": c_lnf, "head": c_head, "bt": (B, T)}
        if targets is None:
            return logits.reshape(B, T, -1), None, cache
        loss, cache["ce"] = self._cross_entropy(logits, targets)
        return None, loss, cache

    def loss(self, x, head_weight, targets):
        """Mean token loss for evaluation (nothing kept for backward)."""
        return self.forward(x, head_weight, targets)[1]

    def _cross_entropy(self, z, targets):
        """Softmax cross-entropy over the group's columns, in place on z (N, Vk)."""
        xp = array_module(z)
        rows = xp.arange(z.shape[0])
        peak = z.max(axis=-1)  # (N,)
        self.group.max(peak)
        z -= peak[:, None]  # stable: exp of values <= 0, as the whole-vocabulary softmax
        local, inside = _local(xp, targets.reshape(-1), self.lo, self.rows)
        zt = z[rows, local] * inside  # (N,) the shifted target logit, on the rank that holds it
        self.group.sum(zt)
        xp.exp(z, out=z)
        total = z.sum(axis=-1)  # (N,)
        self.group.sum(total)
        z /= total[:, None]
        loss = float((xp.log(total) - zt).sum(dtype=xp.float64)) / z.shape[0]
        return loss, (z, local, inside, rows)

    def backward(self, cache, loss_scale=1.0):
        """-> dx (B, T, C) of loss_scale * mean token loss; adds into wte_k's and ln_f's gradients."""
        probs, local, inside, rows = cache.pop("ce")
        probs[rows[inside], local[inside]] -= 1.0
        probs *= loss_scale / probs.shape[0]  # (N, Vk) dlogits, in the head's output buffer
        dx = self.ops.lm_head.backward(probs, cache["head"], self.dwte)  # (N, C) partial sum
        del probs
        self.group.sum(dx)
        dx = dx.reshape(*cache["bt"], -1)
        return self.ops.layernorm.backward(dx, cache["lnf"], self.dln_w, self.dln_b)


def _local(xp, ids, lo, rows):
    """ids shifted to this rank's rows, 0 where another rank holds them, and the mask of its own."""
    local = ids - lo
    inside = (local >= 0) & (local < rows)
    return xp.where(inside, local, 0), inside

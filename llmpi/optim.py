"""Optimizers, gradient clipping and the LR schedule, all on the flat buffers (no per-parameter loops).

Weight decay is decoupled (AdamW) and applied only where `FlatParams.decay_mask()` is 1:
every weight with ndim >= 2, i.e. the matrices and both embeddings (wte is also the LM
head), as GPT-2/nanoGPT do; biases and LayerNorm parameters are never decayed.
"""
import math

import numpy as np

from . import gpu_ops


def _state_array(xp, value, like):
    return xp.asarray(value, dtype=like.dtype).reshape(like.shape)


class AdamW:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0):
        self.params = params
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        xp = params.xp
        self.m = xp.zeros_like(params.data)
        self.v = xp.zeros_like(params.data)
        self.mask = params.decay_mask()
        self.t = 0

    def delta(self, lr=None):
        """Advance the moments by one step on params.grad and return the update u
        (params_new = params + u) without applying it; the async mode pushes u."""
        lr = self.lr if lr is None else lr
        p, g = self.params.data, self.params.grad
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        if gpu_ops.enabled_for(p):
            return self._fused(lr, out=self.params.xp.empty_like(p))
        self.m *= b1
        self.m += (1.0 - b1) * g
        self.v *= b2
        gg = g * g
        gg *= 1.0 - b2
        self.v += gg
        bc1 = 1.0 - b1 ** self.t
        bc2 = 1.0 - b2 ** self.t
        u = self.params.xp.sqrt(self.v, out=gg)  # reuse the temporary: fewer passes over memory
        u *= 1.0 / math.sqrt(bc2)
        u += self.eps
        self.params.xp.divide(self.m, u, out=u)
        u *= -lr / bc1
        if self.weight_decay:
            decay = self.mask * p  # decoupled: uses the weights before this step, like torch AdamW
            decay *= lr * self.weight_decay
            u -= decay
        return u

    def _fused(self, lr, out=None):
        """One pass of the CUDA kernel over p, g, m, v (step self.t); out=None updates p in place."""
        return gpu_ops.adamw_update(self.params.data, self.params.grad, self.m, self.v, self.mask, lr,
                                    self.beta1, self.beta2, self.eps, self.weight_decay, self.t, out=out)

    def step(self, lr=None):
        if gpu_ops.enabled_for(self.params.data):
            self.t += 1
            self._fused(self.lr if lr is None else lr)
            return
        self.params.data += self.delta(lr)

    def state_dict(self):
        return {"m": self.m, "v": self.v, "step": np.array(self.t, dtype=np.int64)}

    def load_state_dict(self, d):
        xp = self.params.xp
        self.m[...] = _state_array(xp, d["m"], self.m)
        self.v[...] = _state_array(xp, d["v"], self.v)
        self.t = int(d["step"])


class SGD:
    """SGD with (Nesterov) momentum as torch.optim.SGD (dampening 0); weight decay is the
    coupled L2 term added to the gradient, masked like AdamW's."""

    def __init__(self, params, lr=1e-2, momentum=0.0, nesterov=False, weight_decay=0.0):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.params = params
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.buf = params.xp.zeros_like(params.data)
        self.mask = params.decay_mask()
        self.t = 0

    def delta(self, lr=None):
        lr = self.lr if lr is None else lr
        p = self.params.data
        g = self.params.grad.copy()
        if self.weight_decay:
            g += self.weight_decay * (self.mask * p)
        self.t += 1
        if self.momentum:
            self.buf *= self.momentum
            self.buf += g
            if self.nesterov:
                g += self.momentum * self.buf
            else:
                g[...] = self.buf
        g *= -lr
        return g

    def step(self, lr=None):
        self.params.data += self.delta(lr)

    def state_dict(self):
        return {"momentum_buffer": self.buf, "step": np.array(self.t, dtype=np.int64)}

    def load_state_dict(self, d):
        self.buf[...] = _state_array(self.params.xp, d["momentum_buffer"], self.buf)
        self.t = int(d["step"])


def clip_grad_norm(grad, max_norm):
    """Scale the flat `grad` in place so its global L2 norm is at most max_norm (0 disables).
    Returns the norm before clipping, as a float."""
    if gpu_ops.enabled_for(grad):
        return gpu_ops.clip_grad_norm(grad, max_norm)
    norm = math.sqrt(float(grad.dot(grad)))
    if max_norm > 0 and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)
    return norm


def lr_at(step, lr, warmup_iters, decay_iters, min_lr):
    """Linear warmup to lr over warmup_iters steps, cosine down to min_lr at decay_iters,
    constant min_lr after (nanoGPT's get_lr)."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / (decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

"""Optimizers and the LR schedule, all on the flat buffers (no per-parameter loops).

Weight decay is decoupled (AdamW) and applied only where `FlatParams.decay_mask()` is 1:
every weight with ndim >= 2, i.e. the matrices and both embeddings (wte is also the LM
head), as GPT-2/nanoGPT do; biases and LayerNorm parameters are never decayed.
AdamW's update runs through the op table (llmpi.ops: the NumPy passes or one CUDA kernel).
"""
import math

import numpy as np

from ..ops import op_table


def _state_array(xp, value, like):
    return xp.asarray(value, dtype=like.dtype).reshape(like.shape)


class AdamW:
    """`ops`: the op table whose adamw_update runs the step; by default the one for the params."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, ops=None):
        self.params = params
        self.ops = ops or op_table(params.xp, params.dtype)
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        xp = params.xp
        self.m = xp.zeros_like(params.data)
        self.v = xp.zeros_like(params.data)
        self.mask = params.decay_mask()
        self.t = 0

    def _update(self, lr, out=None):
        self.t += 1
        return self.ops.adamw_update(self.params.data, self.params.grad, self.m, self.v, self.mask,
                                     self.lr if lr is None else lr, self.beta1, self.beta2, self.eps,
                                     self.weight_decay, self.t, out=out)

    def delta(self, lr=None):
        """Advance the moments by one step on params.grad and return the update u
        (params_new = params + u) without applying it; the async mode pushes u."""
        return self._update(lr, out=self.params.xp.empty_like(self.params.data))

    def step(self, lr=None):
        self._update(lr)

    def next_scalars(self, lr=None):
        """Advance to the next step and return its scalars (lr, 1 - beta1^t, 1 - beta2^t, gradient
        scale 1) as a host array of the params' dtype, for step_from."""
        self.t += 1
        lr = self.lr if lr is None else lr
        return np.array([lr, 1.0 - self.beta1 ** self.t, 1.0 - self.beta2 ** self.t, 1.0], dtype=self.params.dtype)

    def step_from(self, hyper):
        """The step whose scalars next_scalars gave, read from `hyper` (an array beside the params,
        its last entry the gradient's scale): a captured step replays with new values there."""
        self.ops.adamw_update_from(self.params.data, self.params.grad, self.m, self.v, self.mask, hyper,
                                   self.beta1, self.beta2, self.eps, self.weight_decay)

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


OPTIMIZERS = ("adamw", "sgd")  # optim.name


def make_optimizer(cfg, params, ops=None):
    """The optimizer an OptimConfig names, over `params` (`ops`: the model's op table)."""
    if cfg.name == "adamw":
        return AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                     ops=ops)
    return SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


def lr_at(step, lr, warmup_iters, decay_iters, min_lr):
    """Linear warmup to lr over warmup_iters steps, cosine down to min_lr at decay_iters,
    constant min_lr after (nanoGPT's get_lr)."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / (decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def schedule_lr(job, step):
    """The job's learning rate at `step` (its [optim] lr and [schedule])."""
    s = job.schedule
    return lr_at(step, job.optim.lr, s.warmup_iters, s.decay_iters or job.train.max_iters, s.min_lr)

"""One flat parameter buffer and one flat gradient buffer with named views.

Like llm.c's malloc_and_point_parameters: every parameter is a view into `data`
and every gradient a view into `grad`, so communication and the optimizer work on
one contiguous array (or contiguous buckets of it). The layout order is the
forward order, so backward finishes the gradients of later blocks first and each
block's gradients form one contiguous span.
"""
import math

import numpy as np


class FlatParams:
    """`layout` is a list of (name, shape); `xp` is numpy or cupy.

    `data`, if given, is an existing flat parameter buffer of the right size and
    dtype to view instead of allocating one (no copy); the gradient buffer is
    always new. See `sharing()`.
    """

    def __init__(self, layout, xp=np, dtype=np.float32, data=None):
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.layout = [(name, tuple(int(s) for s in shape)) for name, shape in layout]
        self.names = [name for name, _ in self.layout]
        if len(set(self.names)) != len(self.names):
            raise ValueError("duplicate parameter names in layout")
        self.spans = {}
        offset = 0
        for name, shape in self.layout:
            size = math.prod(shape)
            self.spans[name] = (offset, size)
            offset += size
        self.size = offset
        if data is None:
            data = xp.zeros(offset, dtype=self.dtype)
        elif data.shape != (offset,) or data.dtype != self.dtype or not data.flags.c_contiguous:
            raise ValueError(f"shared data buffer must be contiguous {self.dtype} of shape ({offset},)")
        self.data = data
        self.grad = xp.zeros(offset, dtype=self.dtype)
        self.views = self.views_of(self.data)
        self.grad_views = self.views_of(self.grad)

    def views_of(self, flat):
        """{name: view} into any flat buffer of this layout (parameters, gradients, optimizer state)."""
        return {name: flat[o:o + n].reshape(shape)
                for (name, shape), (o, n) in zip(self.layout, self.spans.values())}

    def sharing(self):
        """A FlatParams over the same `data` buffer (weights shared, no copy) with its own
        zeroed `grad`: a replica for computing gradients of another part of the batch."""
        return FlatParams(self.layout, self.xp, self.dtype, data=self.data)

    def shape(self, name):
        return self.views[name].shape

    def zero_grad(self):
        self.grad.fill(0)

    def decay_mask(self):
        """1.0 on every element of a weight with ndim >= 2 (matrices and embeddings), else 0.0.

        Biases and LayerNorm gains/shifts are not decayed, as in GPT-2/nanoGPT.
        """
        mask = np.zeros(self.size, dtype=self.dtype)
        for name, shape in self.layout:
            if len(shape) >= 2:
                o, n = self.spans[name]
                mask[o:o + n] = 1.0
        return self.xp.asarray(mask)

    def load(self, flat):
        """Copy a flat host or device array into `data`."""
        if flat.shape != self.data.shape:
            raise ValueError(f"flat parameter size {flat.shape} != {self.data.shape}")
        self.data[...] = self.xp.asarray(flat, dtype=self.dtype)

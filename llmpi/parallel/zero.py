"""ZeRO stage 1 (Rajbhandari et al., SC'20): the optimizer state sharded over a data group.

The D ranks of a data group hold the same flat buffer (the whole model, or one shard of one
stage). Rank r owns the contiguous slice [lo_r, hi_r) of it. One step:
  reduce     a reduce-scatter of the gradient: rank r receives the sum over the group of its own
             slice only (the ring's first half, llmpi.comm.allreduce.ring, or MPI_Reduce_scatter);
  clip       the global norm is the sum of every rank's slice (the caller adds the sums of squares
             over the ranks, then `clip` scales the slice);
  step       the optimizer (AdamW, SGD) updates only the slice, with moments for the slice only;
  gather     an all-gather of the parameters: every replica receives each slice from its owner,
             so all hold bitwise the same parameters, as after a replicated step.
A ring's reduce-scatter + all-gather moves the bytes of one all-reduce, so ZeRO-1 costs no
extra communication; it divides the optimizer state (AdamW: 2 of the 4 buffers) by D.
Checkpoints hold the whole buffer's state by name: `state_dict` gathers the slices to the group's
rank 0 (collective), `load_state_dict` keeps this rank's slice of a whole one.
"""
import numpy as np
from mpi4py import MPI

from ..backend import copy_to_device, is_device_array, to_host
from ..comm.allreduce import ring


class _Slice:
    """The view of a FlatParams that an optimizer needs, over [lo, hi) of its buffers."""

    def __init__(self, params, lo, hi):
        self.xp, self.dtype = params.xp, params.dtype
        self.data, self.grad = params.data[lo:hi], params.grad[lo:hi]
        self._mask = params.decay_mask()[lo:hi]
        self.size = hi - lo

    def decay_mask(self):
        return self._mask


class ShardedOptimizer:
    """ZeRO-1 over `comm` (the data group) for `params`; `make(params_like)` builds the optimizer
    of one slice; `algorithm` "ring" uses the ring's halves, anything else MPI's collectives."""

    def __init__(self, params, make, comm, algorithm="mpi"):
        self.params, self.comm, self.ring = params, comm, algorithm == "ring"
        self.D, self.rank = comm.Get_size(), comm.Get_rank()
        spans = [self._span(r) for r in range(self.D)]
        self.lo, self.hi = spans[self.rank]
        self.counts = [hi - lo for lo, hi in spans]
        self.displs = [lo for lo, _ in spans]
        self.slice = _Slice(params, self.lo, self.hi)
        self.inner = make(self.slice)

    def _span(self, r):
        if self.ring:  # the chunk the ring's reduce-scatter leaves complete on rank r
            return ring.owned_span(self.params.size, r, self.D)
        bounds = np.linspace(0, self.params.size, self.D + 1).astype(np.int64)
        return int(bounds[r]), int(bounds[r + 1])

    @property
    def t(self):
        return self.inner.t

    def state_bytes(self):
        """Bytes of this rank's optimizer state (its slice's moments)."""
        return sum(v.nbytes for k, v in self.inner.state_dict().items() if k != "step")

    def reduce(self, grad):
        """The reduce-scatter: grad[lo:hi] becomes the group's sum (the rest of grad is stale)."""
        if self.D == 1:
            return
        host = to_host(grad) if is_device_array(grad) else grad
        if self.ring:
            ring.reduce_scatter(host, self.comm)
        else:
            mine = np.empty(self.counts[self.rank], dtype=host.dtype)
            self.comm.Reduce_scatter(host, mine, self.counts, op=MPI.SUM)
            host[self.lo:self.hi] = mine
        if host is not grad:
            copy_to_device(host[self.lo:self.hi], grad[self.lo:self.hi])

    def own_spans(self, spans):
        """The parts of [(lo, hi)] within this rank's slice: what it adds to the global norm."""
        return [(max(lo, self.lo), min(hi, self.hi)) for lo, hi in spans if min(hi, self.hi) > max(lo, self.lo)]

    def clip(self, clip_grad_norm, max_norm, norm):
        clip_grad_norm(self.slice.grad, max_norm, norm=norm)

    def step(self, lr=None):
        """Update the slice, then the all-gather of the parameters."""
        self.inner.step(lr)
        self._all_gather(self.params.data)

    def _all_gather(self, flat):
        if self.D == 1:
            return
        host = to_host(flat) if is_device_array(flat) else flat
        if self.ring:
            ring.all_gather(host, self.comm)
        else:
            self.comm.Allgatherv(MPI.IN_PLACE, [host, (self.counts, self.displs)])
        if host is not flat:
            copy_to_device(host, flat)

    def state_dict(self):
        """Collective over the group: on its rank 0 the whole buffer's state ({key: flat}, "step"),
        None on the others."""
        out = {}
        for key, value in self.inner.state_dict().items():
            if key == "step":
                out[key] = value
                continue
            part = np.ascontiguousarray(to_host(value))
            whole = np.empty(self.params.size, dtype=part.dtype) if self.rank == 0 else None
            self.comm.Gatherv(part, [whole, (self.counts, self.displs)] if self.rank == 0 else None, root=0)
            out[key] = whole
        return out if self.rank == 0 else None

    def load_state_dict(self, d):
        """d: the whole buffer's state (every rank reads the same checkpoint); keeps the slice."""
        self.inner.load_state_dict({k: v if k == "step" else np.asarray(v)[self.lo:self.hi] for k, v in d.items()})

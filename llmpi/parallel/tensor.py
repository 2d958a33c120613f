"""Tensor parallelism (Megatron-LM's split of each layer by features): the K ranks of a tensor
group hold 1/K of every block's matrices and compute 1/K of its heads and MLP channels, while the
activations between the layers stay whole, the same on every rank of the group.

Per block, with the HF Conv1D layout W (in, out) and y = x @ W + b:
  attn.c_attn  column-parallel by whole heads: rank k holds the columns of heads
               [k NH/K, (k+1) NH/K) of each of q, k and v (and that part of the bias), so its
               attention runs over its own heads without communication;
  attn.c_proj  row-parallel: the rows of those heads; each rank's product is a partial sum,
               all-reduced in the group, then the replicated bias is added;
  mlp.c_fc     column-parallel (4C/K columns and their bias), GELU on its own columns;
  mlp.c_proj   row-parallel like attn.c_proj.
Forward all-reduces each row-parallel product (2 per block), backward the input gradient of each
column-parallel product (2 per block): its input is replicated, but each rank holds only its
columns' share of that gradient. That is 4 all-reduces of (b, T, C) per block and micro-batch.
LayerNorms and the row-parallel biases are replicated: their inputs and output gradients are the
replicated activations, so their gradients come out equal on every rank of the group.

The embedding and the LM head are vocab-parallel (llmpi.parallel.vocab): wte, the largest matrix
(38.6M of GPT-2 124M's parameters) and the (B, T, V) logits, the largest activation, are split
too, at the price of a parallel cross-entropy (three all-reduces of one number per token).
Replicating them would cost neither, but every rank would hold all of wte and all of the logits,
which is what stops the memory per rank from falling with K.

Shards keep the HF names, so checkpoints hold pieces that `unshard` joins into the whole tensor
for any other K (llmpi.training.checkpoint).
"""
import numpy as np
from mpi4py import MPI

from ..backend import copy_to_device, is_device_array, to_host
from .vocab import VocabEmbedding, VocabHead

# HF name suffix -> (axis, groups): the axis cut into K parts within each of `groups` equal parts
SPLITS = {
    "attn.c_attn.weight": (1, 3), "attn.c_attn.bias": (0, 3),  # q | k | v, each by heads
    "mlp.c_fc.weight": (1, 1), "mlp.c_fc.bias": (0, 1),
    "attn.c_proj.weight": (0, 1), "mlp.c_proj.weight": (0, 1),
}


def split_of(name):
    """(axis, groups) of a sharded parameter, "vocab" for wte, None for a replicated one."""
    if name == "wte":
        return "vocab"
    return SPLITS.get(name.split(".", 2)[-1]) if name.startswith("h.") else None


def vocab_rows(V, K):
    """Rows of wte per rank: V / K rounded up (the last rank's tail is zero padding)."""
    return -(-V // K)


def shard_shape(name, shape, K):
    split = split_of(name)
    if K == 1 or split is None:
        return tuple(shape)
    if split == "vocab":
        return (vocab_rows(shape[0], K),) + tuple(shape[1:])
    axis, groups = split
    if shape[axis] % (groups * K):
        raise ValueError(f"{name} {tuple(shape)} does not split into {K} shards along axis {axis}")
    out = list(shape)
    out[axis] //= K
    return tuple(out)


def shard(name, full, k, K):
    """Rank k's part of the whole parameter `full` (a host array)."""
    split = split_of(name)
    if K == 1 or split is None:
        return full
    if split == "vocab":
        rows = vocab_rows(full.shape[0], K)
        part = np.zeros((rows,) + full.shape[1:], dtype=full.dtype)
        piece = full[k * rows:(k + 1) * rows]
        part[:len(piece)] = piece
        return part
    axis, groups = split
    return np.concatenate([np.array_split(g, K, axis=axis)[k] for g in np.split(full, groups, axis=axis)],
                          axis=axis)


def unshard(name, pieces, full_shape):
    """The whole parameter from the K shards `pieces` (in rank order) of any K."""
    split, K = split_of(name), len(pieces)
    if K == 1 or split is None:
        return pieces[0]
    if split == "vocab":
        return np.concatenate(pieces, axis=0)[:full_shape[0]]
    axis, groups = split
    parts = [np.split(p, groups, axis=axis) for p in pieces]  # [k][g]
    return np.concatenate([np.concatenate([parts[k][g] for k in range(K)], axis=axis) for g in range(groups)],
                          axis=axis)


def replicated(name):
    return split_of(name) is None


class TensorGroup:
    """The K ranks that hold the shards of one pipeline stage of one data replica (`comm`, rank k),
    and what the model needs of them: its shard layout, the shards of the initial weights, the
    all-reduces of the activations, and the vocab-parallel embedding and head. `bytes` counts the
    payload all-reduced (the bench compares it with the 4 b T C per block of the theory)."""

    def __init__(self, comm):
        self.comm = comm
        self.k, self.K = comm.Get_rank(), comm.Get_size()
        self.bytes = 0

    def layout(self, layout):
        return [(name, shard_shape(name, shape, self.K)) for name, shape in layout]

    def shard(self, name, full):
        return shard(name, full, self.k, self.K)

    def sum(self, x):
        """All-reduce x (contiguous) in place: the partial products of a row-parallel layer."""
        return self._allreduce(x, MPI.SUM)

    def max(self, x):
        return self._allreduce(x, MPI.MAX)

    def _allreduce(self, x, op):
        if self.K == 1:
            return x
        if not x.flags.c_contiguous:
            raise ValueError("tensor-parallel all-reduce needs a contiguous array")
        self.bytes += x.nbytes
        if is_device_array(x):  # staged through the host: the copy synchronizes the stream first
            host = to_host(x)
            self.comm.Allreduce(MPI.IN_PLACE, host, op=op)
            copy_to_device(host, x)
        else:
            self.comm.Allreduce(MPI.IN_PLACE, x, op=op)
        return x

    def embedding(self, params, ops):
        return VocabEmbedding(params, self)

    def head(self, params, ops, vocab_size):
        return VocabHead(params, ops, self, vocab_size)

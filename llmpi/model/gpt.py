"""GPT-2 on hand-written layers (pre-LN blocks, 4x MLP, tanh GELU, final LN, tied LM head),
written as the chain of stages of llmpi.model.stages: Embedding -> Blocks(0, L) -> Head. A
pipeline stage is a GPT over blocks [a, b) only (`blocks=(a, b)`), with its own flat buffer:
the embedding when a = 0, ln_f and the LM head when b = L (with a tied copy of wte when the
embedding lives on another stage).

Shape legend: B batch, T time (<= block_size), C n_embd, NH n_head, HS = C // NH,
V vocab_size, L n_layer.

Weight layout (one flat buffer, llmpi.model.params.FlatParams, in forward order) uses the
HF GPT-2 names and its Conv1D convention, W is (in, out) and y = x @ W + b, so an
outside reference can load `state_dict()` directly (nn.Linear wants W.T):
    wte (V, C), wpe (block_size, C),
    h.{i}.ln_1.weight (C), h.{i}.ln_1.bias (C),
    h.{i}.attn.c_attn.weight (C, 3C), h.{i}.attn.c_attn.bias (3C)   [q | k | v along the output],
    h.{i}.attn.c_proj.weight (C, C), h.{i}.attn.c_proj.bias (C),
    h.{i}.ln_2.weight (C), h.{i}.ln_2.bias (C),
    h.{i}.mlp.c_fc.weight (C, 4C), h.{i}.mlp.c_fc.bias (4C),
    h.{i}.mlp.c_proj.weight (4C, C), h.{i}.mlp.c_proj.bias (C),
    ln_f.weight (C), ln_f.bias (C).
The LM head is wte itself: logits = ln_f(x) @ wte.T.
"""
import copy
import math

import numpy as np

from ..backend import to_host
from ..ops import op_table
from .params import FlatParams
from .stages import Blocks, Embedding, Head, block_layout, embedding_layout, head_layout

# model.dtype -> the host dtype of the parameters: bf16 means bf16 GPU compute with float32
# master weights, so float32 here (and on the CPU, which computes bf16 models in float32)
DTYPES = {"float32": np.float32, "float64": np.float64, "bf16": np.float32}


def stage_layout(cfg, first, last):
    """The names and shapes a model part over blocks [first, last) holds, in forward order."""
    layout = embedding_layout(cfg) if first == 0 else []
    for i in range(first, last):
        layout += block_layout(cfg, i)
    if last == cfg.n_layer:
        layout += head_layout(cfg)
        if first > 0:  # the LM head is tied to wte: the last stage keeps a copy of its own
            layout += [("wte", (cfg.vocab_size, cfg.n_embd))]
    return layout


def gpt2_layout(cfg):
    return stage_layout(cfg, 0, cfg.n_layer)


def block_activation_bytes(cfg, K=1):
    """Bytes per token one block caches for backward (see GPT.activation_bytes_per_token); on one of
    K tensor shards the per-head and per-channel parts (qkv, probs, attention out, fc and gelu out)
    are 1/K, the LayerNorms' inputs and outputs whole; model.recompute = "gelu" keeps no gelu out,
    "gelu+ln" no LayerNorm out either."""
    C, NH, T = cfg.n_embd, cfg.n_head, cfg.block_size
    whole = (2 if cfg.recompute == "gelu+ln" else 4) * C
    sharded = (12 if cfg.recompute == "none" else 8) * C + NH * T
    return (whole + sharded // K + 4) * np.dtype(DTYPES[cfg.dtype]).itemsize


def head_activation_bytes(cfg, K=1):
    """Bytes per token ln_f and the LM head keep for backward: (2C + 2 + V) x itemsize, the
    logits' V being ceil(V / K) on one of K vocab-parallel shards."""
    return (2 * cfg.n_embd + 2 + -(-cfg.vocab_size // K)) * np.dtype(DTYPES[cfg.dtype]).itemsize


def parameter_bytes(cfg, first=0, last=None):
    """Bytes of the parameters a part over blocks [first, last) holds (one flat buffer)."""
    layout = stage_layout(cfg, first, cfg.n_layer if last is None else last)
    return sum(math.prod(shape) for _, shape in layout) * np.dtype(DTYPES[cfg.dtype]).itemsize


class GPT:
    """The model (or, with `blocks=(a, b)`, the part of it one pipeline stage holds) over one flat
    parameter buffer. `ops`: an op table (llmpi.model.ops); by default the one for xp and
    cfg.dtype (llmpi.ops.op_table). `tensor`: None for whole layers, or this rank's tensor group
    (llmpi.parallel.tensor.TensorGroup): the buffer then holds this rank's shards under the same
    names, and the group supplies the all-reduces and the vocab-parallel embedding and head."""

    def __init__(self, cfg, xp=np, seed=0, ops=None, blocks=None, tensor=None):
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (take it from the data file)")
        self.cfg = cfg
        self.xp = xp
        self.ops = ops or op_table(xp, cfg.dtype, sharded=tensor is not None and tensor.K > 1)
        self.first, self.last = blocks or (0, cfg.n_layer)
        if not 0 <= self.first < self.last <= cfg.n_layer:
            raise ValueError(f"blocks [{self.first}, {self.last}) are not a range of the {cfg.n_layer} blocks")
        self.whole = (self.first, self.last) == (0, cfg.n_layer)
        self.tensor = tensor
        layout = stage_layout(cfg, self.first, self.last)
        self.params = FlatParams(tensor.layout(layout) if tensor else layout, xp, DTYPES[cfg.dtype])
        # what the stages hand each other (pipeline messages): bf16 bit patterns on the GPU's bf16 table
        self.activation_dtype = self.ops.activation_dtype or self.params.dtype
        self._bind()
        self._init_weights(seed)

    def _bind(self):
        """The stages and the matmuls' weights over the current `params`."""
        p, cfg = self.params, self.cfg
        self.weights = self.ops.weights(p)  # what the matmuls read: the params, or padded/bf16 copies
        t = self.tensor
        if self.first == 0:
            self.embedding = t.embedding(p, self.ops) if t else Embedding(p, self.ops)
        else:
            self.embedding = None
        self.blocks = Blocks(p, self.ops, cfg.n_head // (t.K if t else 1), self.first, self.last,
                             reduce=t.sum if t else None, recompute=cfg.recompute)
        if self.last == cfg.n_layer:
            self.head = t.head(p, self.ops, cfg.vocab_size) if t else Head(p, self.ops, cfg.vocab_size)
        else:
            self.head = None

    def _init_weights(self, seed):
        """GPT-2 init: N(0, 0.02) weights, N(0, 0.02/sqrt(2L)) residual projections, zero biases, unit LN gains.
        The random numbers are drawn over the whole model's layout in order, keeping this part's
        names, so every part (and the tied wte copy, and every tensor shard) starts exactly as in
        the whole model, while only one parameter at a time exists beyond this part's buffer."""
        p = self.params
        rng = np.random.default_rng(seed)
        host = np.zeros(p.size, dtype=np.float64)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, shape in gpt2_layout(self.cfg):
            if len(shape) >= 2:
                std = resid_std if name.endswith("c_proj.weight") else 0.02
                values = rng.standard_normal(math.prod(shape)) * std
            elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                values = 1.0
            else:
                continue
            if name in p.spans:
                offset, size = p.spans[name]
                if self.tensor and not np.isscalar(values):
                    values = self.tensor.shard(name, values.reshape(shape)).ravel()
                host[offset:offset + size] = values
        p.load(host)

    def precision(self) -> str:
        """What the matmuls and the rest compute in, for the startup line."""
        return self.ops.precision(self.cfg.dtype)

    def replica(self):
        """A GPT that shares this model's weights (same `params.data`, no copy) but has its
        own gradient buffer, for computing the gradient of another part of the batch
        concurrently (llmpi.parallel.threaded)."""
        rep = copy.copy(self)
        rep.params = self.params.sharing()
        rep._bind()
        return rep

    def state_dict(self):
        """Named views into the flat parameter buffer (HF GPT-2 names, Conv1D layout)."""
        return dict(self.params.views)

    def num_params(self):
        """All parameters, wte counted once (it is also the LM head), wpe included."""
        return self.params.size

    def activation_bytes_per_token(self):
        """Bytes per token kept for backward by this part's blocks (all n_layer of them in the whole
        model): their count times the per-layer figure, which counts what each layer caches:
        ln_1 input x (C) + mean, rstd (2) + ln_1 out (C) + qkv (3C) + attention probs (NH*T)
        + attention out (C) + residual x (C) + ln_2 mean, rstd (2) + ln_2 out (C)
        + fc out (4C) + gelu out (4C) = (16C + NH*T + 4) * itemsize per layer, T = block_size
        (12C + NH*T + 4 with model.recompute = "gelu", which keeps no gelu out; 10C + NH*T + 4 with
        "gelu+ln", which keeps no ln_1 or ln_2 out either).
        (The head adds (2C + 2 + V) * itemsize per token once; it is left out so that
        dividing by the block count gives the per-layer figure exactly.)
        """
        return (self.last - self.first) * block_activation_bytes(self.cfg)

    def forward(self, idx, targets=None):
        """idx (B, T) int, targets (B, T) int or None -> (logits (B, T, V) or None, loss or None, cache).

        With targets the logits buffer becomes the softmax probabilities kept for
        backward, so logits are not returned (no second (B, T, V) array).
        """
        self._check_whole("forward")
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} > block_size {self.cfg.block_size}")
        matrices = self.weights.refresh()
        x, c_emb = self.embedding.forward(idx)  # (B, T, C)
        x, c_blocks = self.blocks.forward(x, matrices)
        logits, loss, c_head = self.head.forward(x, self.weights.head, targets)
        return logits, loss, {"emb": c_emb, "blocks": c_blocks, "head": c_head}

    def _check_whole(self, what):
        if not self.whole:
            raise ValueError(f"GPT.{what} runs the whole model; a part over blocks [{self.first}, {self.last}) "
                             "runs its stages (embedding, blocks, head) through llmpi.parallel.pipeline")

    def loss(self, idx, targets):
        """Mean token loss of idx (B, T) -> targets (B, T), for evaluation: nothing is kept for
        backward (the kernels' classifier writes no dlogits)."""
        self._check_whole("loss")
        x, _ = self.embedding.forward(idx)
        x, _ = self.blocks.forward(x, self.weights.refresh())
        return self.head.loss(x, self.weights.head, targets)

    def grad_spans(self):
        """The flat spans backward hands to on_block_done, in its order: the last block together
        with ln_f (contiguous at the end), the other blocks in reverse order, and last the
        embeddings (wte is also the LM head, so it is final only at the very end). A rank with
        no samples reports the same spans, so its bucketed all-reduces match the others'."""
        p, L = self.params, self.cfg.n_layer
        spans = [(p.spans[f"h.{i}.ln_1.weight"][0], p.size if i == L - 1 else p.spans[f"h.{i + 1}.ln_1.weight"][0])
                 for i in reversed(range(L))]
        return spans + [(0, p.spans["h.0.ln_1.weight"][0] if L else p.size)]

    def backward(self, cache, loss_scale=1.0, on_block_done=None):
        """Add into params.grad the gradient of loss_scale * mean token loss (consumes `cache`).

        on_block_done(lo, hi) gets each span of grad_spans() as soon as its gradients are final.
        """
        self._check_whole("backward")
        spans = self.grad_spans() if on_block_done is not None else None
        L = self.cfg.n_layer
        block_done = (lambda i: on_block_done(*spans[L - 1 - i])) if on_block_done is not None else None
        dx = self.head.backward(cache["head"], loss_scale)
        dx = self.blocks.backward(dx, cache["blocks"], block_done)
        self.embedding.backward(dx, cache["emb"])
        if on_block_done is not None:
            on_block_done(*spans[-1])

    def generate(self, idx, n, temperature=1.0, top_k=None, rng=None):
        """Append n sampled tokens to idx (B, T) int; returns a host int64 array (B, T + n)."""
        rng = rng if rng is not None else np.random.default_rng()
        out = np.asarray(to_host(idx), dtype=np.int64)
        for _ in range(n):
            ctx = self.xp.asarray(out[:, -self.cfg.block_size:])
            logits, _, _ = self.forward(ctx)
            last = to_host(logits[:, -1, :]).astype(np.float64)  # (B, V)
            if temperature <= 0:
                nxt = last.argmax(axis=-1)
            else:
                last /= temperature
                if top_k:
                    kth = np.sort(last, axis=-1)[:, -min(top_k, last.shape[-1])][:, None]
                    last[last < kth] = -np.inf
                last -= last.max(axis=-1, keepdims=True)
                prob = np.exp(last)
                prob /= prob.sum(axis=-1, keepdims=True)
                nxt = np.array([rng.choice(prob.shape[-1], p=row) for row in prob])
            out = np.concatenate([out, nxt[:, None]], axis=1)
        return out

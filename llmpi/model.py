"""GPT-2 on hand-written layers (pre-LN blocks, 4x MLP, tanh GELU, final LN, tied LM head).

Shape legend: B batch, T time (<= block_size), C n_embd, NH n_head, HS = C // NH,
V vocab_size, L n_layer.

Weight layout (one flat buffer, llmpi.params.FlatParams, in forward order) uses the
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
import ctypes
import ctypes.util
import math
import sys
from types import SimpleNamespace

import numpy as np

from . import bf16, gpu_ops, lm_head
from .backend import to_host
from .layers import attention, crossentropy, embedding, gelu, layernorm, linear, residual
from .params import FlatParams

# The non-matmul layers: the NumPy/CuPy layer modules, or the CUDA kernels (llmpi.gpu_ops)
# behind the same forward/backward signatures. Matmuls are xp.matmul either way (cuBLAS on GPU).
LAYER_OPS = SimpleNamespace(embedding=embedding, layernorm=layernorm, gelu=gelu, residual=residual,
                            attention=attention, crossentropy=crossentropy)
KERNEL_OPS = SimpleNamespace(
    embedding=SimpleNamespace(forward=gpu_ops.embedding_forward, backward=gpu_ops.embedding_backward),
    layernorm=SimpleNamespace(forward=gpu_ops.layernorm_forward, backward=gpu_ops.layernorm_backward),
    gelu=SimpleNamespace(forward=gpu_ops.gelu_forward, backward=gpu_ops.gelu_backward),
    residual=SimpleNamespace(forward=gpu_ops.residual_forward, backward=residual.backward),
    attention=SimpleNamespace(forward=gpu_ops.attention_forward, backward=gpu_ops.attention_backward),
    crossentropy=SimpleNamespace(forward=gpu_ops.crossentropy_forward, backward=gpu_ops.crossentropy_backward))



def _project(x, W):
    """x (..., IN) @ W (IN, OUT) without bias -> (out, the cache of llmpi.layers.linear)."""
    return (x.reshape(-1, x.shape[-1]) @ W).reshape(*x.shape[:-1], W.shape[1]), (x, W)


# The matmuls: xp.matmul on the model's own dtype (cuBLAS on GPU, TF32 with CUPY_TF32=1), or,
# for model.dtype = "bf16" on the GPU, llmpi.bf16's GEMMs on bf16 copies with float32 results.
MATMULS = SimpleNamespace(linear=linear, project=_project, lm_head_forward=lm_head.forward,
                          lm_head_backward=lm_head.backward)
BF16_MATMULS = SimpleNamespace(
    linear=SimpleNamespace(forward=bf16.linear_forward, backward=bf16.linear_backward),
    project=bf16.project, lm_head_forward=bf16.lm_head_forward, lm_head_backward=bf16.lm_head_backward)


def _attention_forward_bf16_when_possible(qkv, n_head):
    """bf16 models take the bf16 tensor-core attention where it has entry points, whatever CUPY_TF32 says."""
    precision = "bf16" if gpu_ops.attention_tc_possible(qkv, n_head) else "fp32"
    return gpu_ops.attention_forward(qkv, n_head, precision=precision)


BF16_KERNEL_OPS = SimpleNamespace(**{**vars(KERNEL_OPS), "attention": SimpleNamespace(
    forward=_attention_forward_bf16_when_possible, backward=gpu_ops.attention_backward)})

BLOCK_PARAMS = [
    ("ln_1.weight", lambda C: (C,)), ("ln_1.bias", lambda C: (C,)),
    ("attn.c_attn.weight", lambda C: (C, 3 * C)), ("attn.c_attn.bias", lambda C: (3 * C,)),
    ("attn.c_proj.weight", lambda C: (C, C)), ("attn.c_proj.bias", lambda C: (C,)),
    ("ln_2.weight", lambda C: (C,)), ("ln_2.bias", lambda C: (C,)),
    ("mlp.c_fc.weight", lambda C: (C, 4 * C)), ("mlp.c_fc.bias", lambda C: (4 * C,)),
    ("mlp.c_proj.weight", lambda C: (4 * C, C)), ("mlp.c_proj.bias", lambda C: (C,)),
]


def gpt2_layout(cfg):
    C = cfg.n_embd
    layout = [("wte", (cfg.vocab_size, C)), ("wpe", (cfg.block_size, C))]
    for i in range(cfg.n_layer):
        layout += [(f"h.{i}.{n}", shape(C)) for n, shape in BLOCK_PARAMS]
    layout += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return layout


def keep_freed_memory():
    """Stop glibc from returning freed activation-sized blocks to the OS.

    By default glibc mmaps each block over 128 KiB and unmaps or trims it on free, so
    every (B, T, 4C) temporary of every step pays fresh page faults; that costs more
    than the arithmetic (a 20x slower GELU backward at the baby shape). Raising the
    mmap and trim thresholds keeps the freed memory in the heap for reuse (peak RSS
    is unchanged: it is the steady-state working set). No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        if not libc.mallopt(M_MMAP_THRESHOLD, 1 << 30):
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc builds that cap the threshold
    except (OSError, AttributeError):
        pass


def dtype_of(name):
    """Compute dtype on the host: bf16 means bf16 GPU compute with fp32 master weights, so fp32 here."""
    return {"float32": np.float32, "float64": np.float64, "bf16": np.float32}[name]


class GPT:
    def __init__(self, cfg, xp=np, seed=0):
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (take it from the data file)")
        self.cfg = cfg
        self.xp = xp
        if xp is np:
            keep_freed_memory()
        self.params = FlatParams(gpt2_layout(cfg), xp, dtype_of(cfg.dtype))
        # float32 on the GPU runs the CUDA kernels; float64 (gradient checks) keeps the layers
        self.kernels = gpu_ops.enabled_for(self.params.data)
        self.ops = KERNEL_OPS if self.kernels else LAYER_OPS
        self.mm = MATMULS
        self.bf16_weights = None  # bf16 copies of the matrices, on the GPU with dtype "bf16"
        self.head_weight = None  # wte with zero rows up to lm_head.padded_vocab(V), GPU float32
        Vp = lm_head.padded_vocab(cfg.vocab_size) if self.kernels else cfg.vocab_size
        if cfg.dtype == "bf16" and self.kernels:
            self.ops, self.mm = BF16_KERNEL_OPS, BF16_MATMULS
            self.bf16_weights = bf16.Weights(self.params, head_rows=Vp)
        elif Vp != cfg.vocab_size:
            self.head_weight = xp.zeros((Vp, cfg.n_embd), dtype=self.params.dtype)
        self._init_weights(seed)

    def _init_weights(self, seed):
        """GPT-2 init: N(0, 0.02) weights, N(0, 0.02/sqrt(2L)) residual projections, zero biases, unit LN gains."""
        p = self.params
        rng = np.random.default_rng(seed)
        host = np.zeros(p.size, dtype=np.float64)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, shape in p.layout:
            o, n = p.spans[name]
            if len(shape) >= 2:
                std = resid_std if name.endswith("c_proj.weight") else 0.02
                host[o:o + n] = rng.standard_normal(n) * std
            elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                host[o:o + n] = 1.0
        p.load(host)

    def precision(self) -> str:
        """What the matmuls and the rest compute in, for the startup line."""
        if self.bf16_weights is not None:
            return "bf16 matmuls and attention products (float32 master weights and other ops)"
        if self.cfg.dtype == "bf16":
            return "float32 (bf16 is a GPU mode; the CPU computes it in float32)"
        if self.kernels and gpu_ops.tf32_allowed():
            return "float32 with TF32 tensor-core matmuls and attention (CUPY_TF32=1)"
        return self.cfg.dtype

    def replica(self):
        """A GPT that shares this model's weights (same `params.data`, no copy) but has its
        own gradient buffer, for computing the gradient of another part of the batch
        concurrently (llmpi.threaded)."""
        rep = copy.copy(self)
        rep.params = self.params.sharing()
        return rep

    def state_dict(self):
        """Named views into the flat parameter buffer (HF GPT-2 names, Conv1D layout)."""
        return dict(self.params.views)

    def num_params(self):
        """All parameters, wte counted once (it is also the LM head), wpe included."""
        return self.params.size

    def activation_bytes_per_token(self):
        """Bytes per token kept for backward by all n_layer blocks: n_layer times the per-layer
        figure, which counts what each layer caches:
        ln_1 input x (C) + mean, rstd (2) + ln_1 out (C) + qkv (3C) + attention probs (NH*T)
        + attention out (C) + residual x (C) + ln_2 mean, rstd (2) + ln_2 out (C)
        + fc out (4C) + gelu out (4C) = (16C + NH*T + 4) * itemsize per layer, T = block_size.
        (The head adds (2C + 2 + V) * itemsize per token once; it is left out so that
        dividing by n_layer gives the per-layer figure exactly.)
        """
        C, NH, T = self.cfg.n_embd, self.cfg.n_head, self.cfg.block_size
        return self.cfg.n_layer * (16 * C + NH * T + 4) * self.params.dtype.itemsize

    def forward(self, idx, targets=None):
        """idx (B, T) int, targets (B, T) int or None -> (logits (B, T, V) or None, loss or None, cache).

        With targets the logits buffer becomes the softmax probabilities kept for
        backward, so logits are not returned (no second (B, T, V) array).
        """
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} > block_size {self.cfg.block_size}")
        v, o, mm = self.params.views, self.ops, self.mm
        w = self.bf16_weights.refresh() if self.bf16_weights else v  # the matrices the matmuls read
        x, emb_c = o.embedding.forward(v["wte"], v["wpe"], idx)  # (B, T, C)
        blocks = []
        for i in range(self.cfg.n_layer):
            h = f"h.{i}."
            ln1, c_ln1 = o.layernorm.forward(x, v[h + "ln_1.weight"], v[h + "ln_1.bias"])
            qkv, c_qkv = mm.linear.forward(ln1, w[h + "attn.c_attn.weight"], v[h + "attn.c_attn.bias"])  # (B, T, 3C)
            y, c_att = o.attention.forward(qkv, self.cfg.n_head)  # (B, T, C)
            a, c_proj = mm.linear.forward(y, w[h + "attn.c_proj.weight"], v[h + "attn.c_proj.bias"])
            x, _ = o.residual.forward(x, a)
            ln2, c_ln2 = o.layernorm.forward(x, v[h + "ln_2.weight"], v[h + "ln_2.bias"])
            g, c_fc, c_gelu = self._fc_gelu(ln2, w[h + "mlp.c_fc.weight"], v[h + "mlp.c_fc.bias"])  # (B, T, 4C)
            m, c_mproj = mm.linear.forward(g, w[h + "mlp.c_proj.weight"], v[h + "mlp.c_proj.bias"])
            x, _ = o.residual.forward(x, m)
            blocks.append((c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj))
        xf, c_lnf = o.layernorm.forward(x, v["ln_f.weight"], v["ln_f.bias"])  # (B, T, C)
        full, c_head = mm.lm_head_forward(xf.reshape(B * T, -1), self._lm_head_weight(w))
        logits = full[:, :self.cfg.vocab_size].reshape(B, T, -1)  # (B, T, V): a view of the padded rows
        cache = {"emb": emb_c, "blocks": blocks, "lnf": c_lnf, "head": c_head}
        if targets is None:
            return logits, None, cache
        loss, cache["ce"] = o.crossentropy.forward(logits, targets)
        return None, loss, cache

    def loss(self, idx, targets):
        """Mean token loss of idx (B, T) -> targets (B, T), for evaluation: nothing is kept for
        backward, and on the kernel path the classifier runs without writing dlogits."""
        logits, _, _ = self.forward(idx)
        if not self.kernels:
            return float(self.ops.crossentropy.forward(logits, targets)[0])
        losses = gpu_ops.crossentropy_losses(logits, targets)
        return float(losses.sum(dtype=self.xp.float64)) / losses.size

    def _lm_head_weight(self, w):
        """wte as the LM head reads it: with zero padding rows on the GPU (llmpi.lm_head)."""
        if self.bf16_weights is not None:
            return self.bf16_weights.head
        if self.head_weight is None:
            return w["wte"]
        self.head_weight[:self.cfg.vocab_size] = w["wte"]
        return self.head_weight

    def _fc_gelu(self, x, W, b):
        """gelu(x @ W + b) -> (out, linear cache, gelu cache); the kernels fuse the bias into GELU."""
        if not self.kernels:
            fc, c_fc = linear.forward(x, W, b)
            out, c_gelu = gelu.forward(fc)
            return out, c_fc, c_gelu
        pre, c_fc = self.mm.project(x, W)  # (B, T, 4C)
        out, c_gelu = gpu_ops.bias_gelu_forward(pre, b)
        return out, c_fc, c_gelu

    def _layernorm_backward_into(self, dres, dout, cache, dw, db):
        """dres (B, T, C) += layernorm input gradient (the kernel adds in place, no temporary)."""
        if self.kernels:
            return gpu_ops.layernorm_backward(dout, cache, dw, db, dx=dres)
        dres += layernorm.backward(dout, cache, dw, db)
        return dres

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
        g, o, mm = self.params.grad_views, self.ops, self.mm
        L = self.cfg.n_layer
        spans = self.grad_spans() if on_block_done is not None else None
        dlogits = o.crossentropy.backward(cache.pop("ce"), loss_scale)  # (B, T, V)
        B, T, V = dlogits.shape
        d2 = dlogits.reshape(B * T, V)
        dx = mm.lm_head_backward(d2, cache["head"], g["wte"]).reshape(B, T, -1)  # (B, T, C)
        del dlogits, d2
        dx = o.layernorm.backward(dx, cache["lnf"], g["ln_f.weight"], g["ln_f.bias"])
        for i in reversed(range(L)):
            h = f"h.{i}."
            c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj = cache["blocks"].pop()
            dres, dm = o.residual.backward(dx, None)
            dg = mm.linear.backward(dm, c_mproj, g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"])
            dfc = o.gelu.backward(dg, c_gelu)
            dln2 = mm.linear.backward(dfc, c_fc, g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"])
            dres = self._layernorm_backward_into(dres, dln2, c_ln2, g[h + "ln_2.weight"], g[h + "ln_2.bias"])
            dres, da = o.residual.backward(dres, None)
            dy = mm.linear.backward(da, c_proj, g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"])
            dqkv = o.attention.backward(dy, c_att)
            dln1 = mm.linear.backward(dqkv, c_qkv, g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"])
            dres = self._layernorm_backward_into(dres, dln1, c_ln1, g[h + "ln_1.weight"], g[h + "ln_1.bias"])
            dx = dres
            if on_block_done is not None:
                on_block_done(*spans[L - 1 - i])
        o.embedding.backward(dx, cache["emb"], g["wte"], g["wpe"])
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

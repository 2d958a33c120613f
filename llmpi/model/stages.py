"""The GPT's parts as a chain of stages: the embedding, a range of blocks [first, last), the head.

Each stage holds the parameter and gradient views of its layers, looked up by their HF names in
the FlatParams it is given, and calls its layers through the model's op table. The whole GPT
(llmpi.model.gpt) is the chain over one flat buffer; a rank that holds only blocks [a, b) builds
a Blocks(a, b) over a buffer with just those names. The LM head reads `wte` from the params it
is given: the same view as the embedding's in one buffer, a tied copy in a separate one.

Shape legend: B batch, T time, C n_embd, NH n_head, V vocab_size.
"""

BLOCK_PARAMS = [  # name inside block i (h.{i}.NAME) and its shape for C channels
    ("ln_1.weight", lambda C: (C,)), ("ln_1.bias", lambda C: (C,)),
    ("attn.c_attn.weight", lambda C: (C, 3 * C)), ("attn.c_attn.bias", lambda C: (3 * C,)),
    ("attn.c_proj.weight", lambda C: (C, C)), ("attn.c_proj.bias", lambda C: (C,)),
    ("ln_2.weight", lambda C: (C,)), ("ln_2.bias", lambda C: (C,)),
    ("mlp.c_fc.weight", lambda C: (C, 4 * C)), ("mlp.c_fc.bias", lambda C: (4 * C,)),
    ("mlp.c_proj.weight", lambda C: (4 * C, C)), ("mlp.c_proj.bias", lambda C: (C,)),
]


# model.recompute: what backward rebuilds instead of keeping from forward (llm.c's -r 0, 1, 2)
RECOMPUTE = {
    "none": "backward reads everything forward kept",
    "gelu": "the MLP's GELU output is not kept; backward recomputes it from the pre-activation (4C fewer "
            "values per token and block)",
    "gelu+ln": "as gelu, and the blocks' LayerNorm outputs are not kept either; backward recomputes them "
               "from their inputs and statistics (6C fewer values per token and block)",
}


def embedding_layout(cfg):
    return [("wte", (cfg.vocab_size, cfg.n_embd)), ("wpe", (cfg.block_size, cfg.n_embd))]


def block_layout(cfg, i):
    return [(f"h.{i}.{name}", shape(cfg.n_embd)) for name, shape in BLOCK_PARAMS]


def head_layout(cfg):
    return [("ln_f.weight", (cfg.n_embd,)), ("ln_f.bias", (cfg.n_embd,))]


class Embedding:
    """idx (B, T) int -> x (B, T, C) = wte[idx] + wpe[:T]."""

    def __init__(self, params, ops):
        self.ops = ops
        self.wte, self.wpe = params.views["wte"], params.views["wpe"]
        self.dwte, self.dwpe = params.grad_views["wte"], params.grad_views["wpe"]

    def forward(self, idx):
        return self.ops.embedding.forward(self.wte, self.wpe, idx)

    def backward(self, dx, cache):
        self.ops.embedding.backward(dx, cache, self.dwte, self.dwpe)


class Blocks:
    """Pre-LN transformer blocks first..last-1: x (B, T, C) -> x (B, T, C).
    Per block: x += attn(ln_1(x)); x += mlp(ln_2(x)), mlp = c_proj(gelu(c_fc(.)))."""

    def __init__(self, params, ops, n_head, first, last, reduce=None, recompute="none"):
        """n_head: the heads this rank computes; reduce: None for whole layers, or the in-place sum
        over a tensor group (llmpi.parallel.tensor) when the params are its rank's shards: it then
        follows each row-parallel product and each column-parallel input gradient; recompute: a
        key of RECOMPUTE."""
        self.ops, self.n_head, self.first, self.last, self.reduce = ops, n_head, first, last, reduce
        self.recompute_gelu = recompute in ("gelu", "gelu+ln")
        self.recompute_ln = recompute == "gelu+ln"
        self.names = [{name: f"h.{i}.{name}" for name, _ in BLOCK_PARAMS} for i in range(first, last)]
        self.params, self.grads = params.views, params.grad_views

    def forward(self, x, weights):
        """x (B, T, C) and the matrices the matmuls read -> (x (B, T, C), caches, one per block).
        Each residual add inside the range goes with the LayerNorm after it (ops.residual_layernorm:
        one kernel on the bf16 table); the last block's second add has none after it here."""
        ops, p = self.ops, self.params
        caches = []
        n = self.names[0]
        ln1, c_ln1 = ops.layernorm.forward(x, p[n["ln_1.weight"]], p[n["ln_1.bias"]])
        for i, n in enumerate(self.names):
            qkv, c_qkv = ops.linear.forward(ln1, weights[n["attn.c_attn.weight"]], p[n["attn.c_attn.bias"]])
            att, c_att = ops.attention.forward(qkv, self.n_head)  # qkv (B, T, 3C) -> (B, T, C)
            proj, c_proj = self._row_parallel(att, weights[n["attn.c_proj.weight"]], p[n["attn.c_proj.bias"]])
            x, ln2, c_ln2 = ops.residual_layernorm(x, proj, p[n["ln_2.weight"]], p[n["ln_2.bias"]])
            fc, c_fc = ops.project(ln2, weights[n["mlp.c_fc.weight"]])  # (B, T, 4C), bias added by bias_gelu
            act, c_gelu = ops.bias_gelu.forward(fc, p[n["mlp.c_fc.bias"]])
            mlp, c_mlp = self._row_parallel(act, weights[n["mlp.c_proj.weight"]], p[n["mlp.c_proj.bias"]])
            if self.recompute_gelu:  # c_proj's cache lets go of the (B, T, 4C) activation
                c_mlp = (None, *c_mlp[1:])
            if self.recompute_ln:  # and c_attn's and c_fc's of the LayerNorms' (B, T, C) outputs
                c_qkv, c_fc = (None, *c_qkv[1:]), (None, *c_fc[1:])
            del act, ln1, ln2
            caches.append((c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mlp))
            if i + 1 < len(self.names):
                nxt = self.names[i + 1]
                x, ln1, c_ln1 = ops.residual_layernorm(x, mlp, p[nxt["ln_1.weight"]], p[nxt["ln_1.bias"]])
            else:
                x, _ = ops.residual.forward(x, mlp)
        return x, caches

    def backward(self, dx, caches, on_block_done=None):
        """dx (B, T, C) -> dx (B, T, C), adding into the blocks' gradient views (consumes
        `caches`); on_block_done(i) runs as soon as block i's gradients are final."""
        ops, g = self.ops, self.grads
        for i in reversed(range(self.first, self.last)):
            n = self.names[i - self.first]
            c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mlp = caches.pop()
            dres, dmlp = ops.residual.backward(dx, None)
            if self.recompute_gelu:
                c_mlp = (ops.linear_input(ops.bias_gelu.recompute(c_gelu)), *c_mlp[1:])
            dact = ops.linear.backward(dmlp, c_mlp, g[n["mlp.c_proj.weight"]], g[n["mlp.c_proj.bias"]])
            del c_mlp  # a recomputed activation is freed before the next block's
            dfc = ops.bias_gelu.backward(dact, c_gelu)
            if self.recompute_ln:
                c_fc = self._with_layernorm_output(c_fc, c_ln2, n["ln_2.bias"], dx.shape)
            dln2 = self._gathered(ops.linear.backward(dfc, c_fc, g[n["mlp.c_fc.weight"]], g[n["mlp.c_fc.bias"]]))
            del c_fc
            dres = ops.layernorm.backward(dln2, c_ln2, g[n["ln_2.weight"]], g[n["ln_2.bias"]], dx=dres)
            dres, dproj = ops.residual.backward(dres, None)
            datt = ops.linear.backward(dproj, c_proj, g[n["attn.c_proj.weight"]], g[n["attn.c_proj.bias"]])
            dqkv = ops.attention.backward(datt, c_att)
            if self.recompute_ln:
                c_qkv = self._with_layernorm_output(c_qkv, c_ln1, n["ln_1.bias"], dx.shape)
            dln1 = self._gathered(ops.linear.backward(dqkv, c_qkv, g[n["attn.c_attn.weight"]],
                                                      g[n["attn.c_attn.bias"]]))
            dx = ops.layernorm.backward(dln1, c_ln1, g[n["ln_1.weight"]], g[n["ln_1.bias"]], dx=dres)
            if on_block_done is not None:
                on_block_done(i)
        return dx

    def _with_layernorm_output(self, linear_cache, ln_cache, bias_name, shape):
        """A linear layer's cache whose input, a LayerNorm's (B, T, C) output, was let go: with that
        output recomputed from the LayerNorm's cache."""
        out = self.ops.layernorm.recompute(ln_cache, self.params[bias_name]).reshape(shape)
        return (self.ops.linear_input(out), *linear_cache[1:])

    def _row_parallel(self, x, W, b):
        """x @ W + b; over a tensor group the sum of the ranks' partial products, then the bias."""
        if self.reduce is None:
            return self.ops.linear.forward(x, W, b)
        out, cache = self.ops.project(x, W)
        self.reduce(out)
        out += b
        return out, cache

    def _gathered(self, dx):
        """A column-parallel layer's input gradient: over a tensor group the sum of the ranks' parts."""
        return dx if self.reduce is None else self.reduce(dx)


class Head:
    """x (B, T, C) -> ln_f -> logits (B, T, V) = . @ wte^T, and the mean token loss."""

    def __init__(self, params, ops, vocab_size):
        self.ops, self.vocab_size = ops, vocab_size
        self.ln_w, self.ln_b = params.views["ln_f.weight"], params.views["ln_f.bias"]
        self.dln_w, self.dln_b = params.grad_views["ln_f.weight"], params.grad_views["ln_f.bias"]
        self.dwte = params.grad_views["wte"]

    def forward(self, x, head_weight, targets=None):
        """-> (logits or None, loss or None, cache). With targets the logits buffer becomes what
        the loss keeps for backward, so logits are not returned (no second (B, T, V) array)."""
        logits, cache = self._logits(x, head_weight)
        if targets is None:
            return self.ops.widen(logits), None, cache
        loss, cache["ce"] = self.ops.crossentropy.forward(logits, targets)
        return None, loss, cache

    def _logits(self, x, head_weight):
        """-> (logits (B, T, V) as the table keeps them: a view of the padded rows, cache)."""
        B, T, _ = x.shape
        xf, c_lnf = self.ops.layernorm.forward(x, self.ln_w, self.ln_b)  # (B, T, C)
        full, c_head = self.ops.lm_head.forward(xf.reshape(B * T, -1), head_weight)  # (B*T, Vp)
        return full[:, :self.vocab_size].reshape(B, T, -1), {"lnf": c_lnf, "head": c_head}

    def loss(self, x, head_weight, targets):
        """Mean token loss for evaluation: nothing is kept for backward."""
        logits, _ = self._logits(x, head_weight)
        return float(self.ops.crossentropy.loss(logits, targets))

    def backward(self, cache, loss_scale=1.0):
        """-> dx (B, T, C) of loss_scale * mean token loss; adds into dwte and ln_f's gradients."""
        dlogits = self.ops.crossentropy.backward(cache.pop("ce"), loss_scale)  # (B, T, V)
        B, T, V = dlogits.shape
        dx = self.ops.lm_head.backward(dlogits.reshape(B * T, V), cache["head"], self.dwte).reshape(B, T, -1)
        del dlogits  # the (B, T, V) buffer is free once the head's gradients are in
        return self.ops.layernorm.backward(dx, cache["lnf"], self.dln_w, self.dln_b)

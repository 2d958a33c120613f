"""Whole-model checks: gradient vs finite differences, float32 vs float64, overfitting, hooks."""
import numpy as np
import pytest

from conftest import central_diff, rel_error
from llmpi.config import ModelConfig
from llmpi.model.gpt import GPT
from llmpi.training.optim import AdamW


def tiny(dtype="float64", **kw):
    cfg = dict(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype=dtype)
    cfg.update(kw)
    return ModelConfig(**cfg)


def batch(cfg, B=2, T=5, seed=0):
    r = np.random.default_rng(seed)
    return r.integers(0, cfg.vocab_size, (B, T)), r.integers(0, cfg.vocab_size, (B, T))


def test_layout_and_init():
    cfg = tiny(n_layer=3)
    m = GPT(cfg, seed=1)
    p, sd = m.params, m.state_dict()
    assert p.names[:2] == ["wte", "wpe"] and p.names[-2:] == ["ln_f.weight", "ln_f.bias"]
    assert sd["h.1.attn.c_attn.weight"].shape == (8, 24) and sd["h.2.mlp.c_proj.weight"].shape == (32, 8)
    assert m.num_params() == p.size == p.data.size
    assert np.all(sd["h.0.ln_1.weight"] == 1) and np.all(sd["h.0.mlp.c_fc.bias"] == 0)
    big = GPT(tiny(n_embd=64, n_head=4, vocab_size=500, n_layer=3), seed=0).state_dict()
    assert abs(big["wte"].std() - 0.02) < 2e-3
    assert abs(big["h.0.mlp.c_proj.weight"].std() - 0.02 / np.sqrt(6)) < 1e-3
    assert GPT(tiny("float32")).params.data.dtype == np.float32
    assert GPT(tiny("bf16")).params.data.dtype == np.float32
    np.testing.assert_array_equal(GPT(cfg, seed=1).params.data, p.data)


@pytest.mark.parametrize("B,T", [(2, 5), (1, 1), (3, 6)])
def test_model_gradient_vs_finite_differences(B, T):
    cfg = tiny()
    m = GPT(cfg, seed=2)
    p = m.params
    p.data += np.random.default_rng(3).normal(size=p.size) * 0.1  # LN/bias grads away from their init symmetry
    x, y = batch(cfg, B, T, seed=4)
    _, loss, cache = m.forward(x, y)
    m.backward(cache, loss_scale=0.5)
    idx = np.random.default_rng(5).choice(p.size, 80, replace=False)
    for name in ("h.0.ln_1.bias", "ln_f.weight", "wpe"):  # make sure small tensors are probed too
        o, n = p.spans[name]
        idx = np.r_[idx, o, o + n - 1]
    num = central_diff(lambda: 0.5 * m.forward(x, y)[1], p.data, idx)
    assert rel_error(p.grad[idx], num) < 1e-5


def test_backward_accumulates_and_loss_scale():
    cfg = tiny()
    m = GPT(cfg)
    x, y = batch(cfg)
    m.backward(m.forward(x, y)[2])
    g1 = m.params.grad.copy()
    m.backward(m.forward(x, y)[2], loss_scale=2.0)
    np.testing.assert_allclose(m.params.grad, 3 * g1, rtol=1e-12, atol=1e-15)


def test_float32_matches_float64():
    c64, c32 = tiny(), tiny("float32")
    m64, m32 = GPT(c64, seed=6), GPT(c32, seed=6)
    x, y = batch(c64, 3, 6, seed=7)
    _, l64, k64 = m64.forward(x, y)
    _, l32, k32 = m32.forward(x, y)
    m64.backward(k64)
    m32.backward(k32)
    assert abs(l64 - l32) < 1e-5
    assert m32.params.grad.dtype == np.float32
    assert rel_error(m32.params.grad, m64.params.grad) < 1e-4
    logits32, _, _ = m32.forward(x)
    assert logits32.dtype == np.float32


def test_logits_without_targets_and_loss_consistency():
    cfg = tiny()
    m = GPT(cfg)
    x, y = batch(cfg)
    logits, loss, _ = m.forward(x)
    assert logits.shape == (2, 5, 11) and loss is None
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -np.take_along_axis(lp, y[..., None], -1).mean()
    none, loss, _ = m.forward(x, y)
    assert none is None and abs(loss - ref) < 1e-12
    assert abs(m.loss(x, y) - ref) < 1e-12  # the evaluation path


def test_on_block_done_spans_cover_buffer_in_backward_order():
    cfg = tiny(n_layer=3)
    m = GPT(cfg)
    x, y = batch(cfg)
    spans, final = [], []
    ref = GPT(cfg)
    ref.backward(ref.forward(x, y)[2])

    def hook(lo, hi):
        spans.append((lo, hi))
        final.append(np.array_equal(m.params.grad[lo:hi], ref.params.grad[lo:hi]))

    m.backward(m.forward(x, y)[2], on_block_done=hook)
    p = m.params
    assert spans[0] == (p.spans["h.2.ln_1.weight"][0], p.size)
    assert spans[-1] == (0, p.spans["h.0.ln_1.weight"][0])
    assert all(a[0] == b[1] for a, b in zip(spans, spans[1:]))  # contiguous, walking down
    assert all(final)  # each span is already final when announced


def test_overfit_one_batch():
    cfg = tiny("float32", vocab_size=16, block_size=8, n_embd=32, n_head=4)
    m = GPT(cfg, seed=0)
    x, y = batch(cfg, 4, 8, seed=8)
    opt = AdamW(m.params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    for _ in range(200):
        m.params.zero_grad()
        _, loss, cache = m.forward(x, y)
        m.backward(cache)
        opt.step()
    assert loss < 0.05, loss


def test_generate():
    cfg = tiny()
    m = GPT(cfg)
    out = m.generate(np.array([[1, 2]]), 8, temperature=1.0, top_k=3, rng=np.random.default_rng(0))
    assert out.shape == (1, 10) and np.all(out[:, :2] == [[1, 2]])
    assert out.min() >= 0 and out.max() < cfg.vocab_size
    greedy = m.generate(np.array([[1, 2]]), 3, temperature=0)
    assert np.array_equal(greedy, m.generate(np.array([[1, 2]]), 3, temperature=0))


def test_activation_bytes_per_token():
    cfg = tiny("float32", n_embd=16, n_head=2, block_size=8)
    assert GPT(cfg).activation_bytes_per_token() == cfg.n_layer * (16 * 16 + 2 * 8 + 4) * 4
    cfg.recompute = "gelu"  # no gelu out (4C) kept
    assert GPT(cfg).activation_bytes_per_token() == cfg.n_layer * (12 * 16 + 2 * 8 + 4) * 4
    cfg.recompute = "gelu+ln"  # nor ln_1 and ln_2 out (2C)
    assert GPT(cfg).activation_bytes_per_token() == cfg.n_layer * (10 * 16 + 2 * 8 + 4) * 4


def cached_arrays(cache):
    """The distinct arrays (by memory) a forward's cache holds for backward."""
    found = {}

    def walk(c):
        if isinstance(c, np.ndarray):
            base = c if c.base is None else c.base
            found[id(base)] = base
        elif isinstance(c, (tuple, list)):
            for item in c:
                walk(item)
        elif isinstance(c, dict):
            for item in c.values():
                walk(item)
    walk(cache)
    return found


@pytest.mark.parametrize("recompute,values", [("gelu", 4), ("gelu+ln", 6)])  # fewer kept per token, x C
@pytest.mark.parametrize("dtype,table", [("float64", "layers"), ("float32", "layers"), ("float32", "fused")])
def test_recompute_changes_no_bit(dtype, table, recompute, values):
    """model.recompute: the linear layers' caches let go of the GELU output (and the LayerNorms')
    and backward rebuilds them, so the blocks keep 4C (6C) fewer values per token, and the loss
    and every gradient are the same bits."""
    if table == "fused":
        pytest.importorskip("numba")
        from llmpi.cpu.ops import FUSED_OPS as ops
    else:
        from llmpi.model.ops import LAYER_OPS as ops
    B, T = 3, 6
    kept, rebuilt = (GPT(tiny(dtype, recompute=r), seed=8, ops=ops) for r in ("none", recompute))
    x, y = batch(kept.cfg, B, T, seed=9)
    losses, kept_bytes = [], []
    for m in (kept, rebuilt):
        _, loss, cache = m.forward(x, y)
        losses.append(loss)
        kept_bytes.append(sum(a.nbytes for a in cached_arrays(cache).values()))
        m.backward(cache)
    C, itemsize = kept.cfg.n_embd, np.dtype(dtype).itemsize
    assert kept_bytes[0] - kept_bytes[1] == kept.cfg.n_layer * B * T * values * C * itemsize
    assert losses[0] == losses[1]
    assert np.array_equal(kept.params.grad, rebuilt.params.grad)

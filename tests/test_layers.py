"""Each layer's backward against float64 central finite differences of sum(out * r)."""
import numpy as np
import pytest

from conftest import central_diff, rel_error
from llmpi.model.layers import attention, crossentropy, embedding, gelu, layernorm, linear, residual

TOL = 1e-5
SHAPES = [(2, 5, 6), (1, 1, 4), (3, 7, 9)]  # (B, T, C): includes T=1 and odd sizes


def rng(seed=0):
    return np.random.default_rng(seed)


def check(loss, analytic, x, tol=TOL):
    err = rel_error(analytic, central_diff(loss, x).reshape(x.shape))
    assert err < tol, err


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_layernorm(B, T, C):
    r = rng(1)
    x, w, b = r.normal(size=(B, T, C)), r.normal(size=C), r.normal(size=C)
    dout = r.normal(size=(B, T, C))
    loss = lambda: float((layernorm.forward(x, w, b)[0] * dout).sum())
    out, cache = layernorm.forward(x, w, b)
    dw, db = np.zeros(C), np.zeros(C)
    dx = layernorm.backward(dout, cache, dw, db)
    for a, p in [(dx, x), (dw, w), (db, b)]:
        check(loss, a, p)


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_linear(B, T, C):
    r = rng(2)
    OUT = 2 * C + 1
    x, W, b = r.normal(size=(B, T, C)), r.normal(size=(C, OUT)), r.normal(size=OUT)
    dout = r.normal(size=(B, T, OUT))
    loss = lambda: float((linear.forward(x, W, b)[0] * dout).sum())
    _, cache = linear.forward(x, W, b)
    dW, db = np.zeros_like(W), np.zeros_like(b)
    dx = linear.backward(dout, cache, dW, db)
    for a, p in [(dx, x), (dW, W), (db, b)]:
        check(loss, a, p)


def test_linear_accumulates():
    r = rng(3)
    x, W, b, dout = r.normal(size=(2, 3, 4)), r.normal(size=(4, 5)), r.normal(size=5), r.normal(size=(2, 3, 5))
    dW, db = np.ones_like(W), np.ones_like(b)
    _, cache = linear.forward(x, W, b)
    linear.backward(dout, cache, dW, db)
    np.testing.assert_allclose(dW, 1 + x.reshape(-1, 4).T @ dout.reshape(-1, 5))
    np.testing.assert_allclose(db, 1 + dout.sum(axis=(0, 1)))


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_gelu(B, T, C):
    r = rng(4)
    x, dout = r.normal(size=(B, T, C)) * 2, r.normal(size=(B, T, C))
    loss = lambda: float((gelu.forward(x)[0] * dout).sum())
    check(loss, gelu.backward(dout, gelu.forward(x)[1]), x)


def test_gelu_values():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(gelu.forward(x)[0], ref, rtol=1e-14)


@pytest.mark.parametrize("B,T,C,NH", [(2, 5, 6, 3), (1, 1, 4, 2), (3, 7, 9, 1), (2, 4, 8, 4)])
def test_attention(B, T, C, NH):
    r = rng(5)
    qkv, dout = r.normal(size=(B, T, 3 * C)), r.normal(size=(B, T, C))
    loss = lambda: float((attention.forward(qkv, NH)[0] * dout).sum())
    out, cache = attention.forward(qkv, NH)
    check(loss, attention.backward(dout, cache), qkv)


def test_attention_is_causal():
    r = rng(6)
    qkv = r.normal(size=(2, 6, 12))
    out1, _ = attention.forward(qkv, 2)
    qkv2 = qkv.copy()
    qkv2[:, 4:] = r.normal(size=(2, 2, 12))  # changing the future must not change the past
    out2, _ = attention.forward(qkv2, 2)
    np.testing.assert_allclose(out1[:, :4], out2[:, :4], rtol=1e-13)
    assert out1.shape == (2, 6, 4)


@pytest.mark.parametrize("B,T,C,V", [(2, 5, 6, 7), (1, 1, 4, 3), (3, 7, 5, 11)])
def test_embedding(B, T, C, V):
    r = rng(7)
    wte, wpe = r.normal(size=(V, C)), r.normal(size=(T + 2, C))
    idx = r.integers(0, V, size=(B, T))
    idx[0, 0] = idx[-1, -1]  # a repeated token must accumulate
    dout = r.normal(size=(B, T, C))
    loss = lambda: float((embedding.forward(wte, wpe, idx)[0] * dout).sum())
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    embedding.backward(dout, embedding.forward(wte, wpe, idx)[1], dwte, dwpe)
    check(loss, dwte, wte)
    check(loss, dwpe, wpe)


def test_residual():
    r = rng(8)
    x, fx = r.normal(size=(2, 3, 4)), r.normal(size=(2, 3, 4))
    out, cache = residual.forward(x, fx.copy())
    np.testing.assert_allclose(out, x + fx)
    dout = r.normal(size=x.shape)
    dx, dfx = residual.backward(dout, cache)
    assert dx is dout and dfx is dout


@pytest.mark.parametrize("B,T,V", [(2, 5, 7), (1, 1, 3), (3, 4, 13)])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_crossentropy(B, T, V, scale):
    r = rng(9)
    logits = r.normal(size=(B, T, V)) * 3
    targets = r.integers(0, V, size=(B, T))
    loss = lambda: scale * crossentropy.forward(logits.copy(), targets)[0]
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    ref = -np.take_along_axis(lp, targets[..., None], -1).mean()
    value, cache = crossentropy.forward(logits.copy(), targets)
    assert abs(value - ref) < 1e-12
    check(loss, crossentropy.backward(cache, scale), logits)


def test_crossentropy_stable_and_float32():
    logits = np.array([[[1000.0, 0.0, -1000.0]]], dtype=np.float32)
    loss, cache = crossentropy.forward(logits, np.array([[1]]))
    assert np.isfinite(loss) and abs(loss - 1000.0) < 1e-3
    assert crossentropy.backward(cache).dtype == np.float32


@pytest.mark.parametrize("mod", ["layernorm", "linear", "gelu", "attention"])
def test_float32_stays_float32(mod):
    r = rng(10)
    x = r.normal(size=(2, 3, 12)).astype(np.float32)
    w = r.normal(size=12).astype(np.float32)
    if mod == "layernorm":
        out, cache = layernorm.forward(x, w, w)
        dx = layernorm.backward(out, cache, np.zeros_like(w), np.zeros_like(w))
    elif mod == "linear":
        W = r.normal(size=(12, 5)).astype(np.float32)
        out, cache = linear.forward(x, W, w[:5])
        dx = linear.backward(out, cache, np.zeros_like(W), np.zeros(5, np.float32))
    elif mod == "gelu":
        out, cache = gelu.forward(x)
        dx = gelu.backward(out, cache)
    else:
        out, cache = attention.forward(x, 2)
        dx = attention.backward(out, cache)
    assert out.dtype == np.float32 and dx.dtype == np.float32

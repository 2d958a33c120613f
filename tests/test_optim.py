"""Optimizers against straightforward per-parameter reference formulas; clipping; LR schedule."""
import math

import numpy as np
import pytest

from llmpi.model.layers.gradnorm import clip_factor, clip_grad_norm
from llmpi.training.optim import SGD, AdamW, lr_at
from llmpi.model.params import FlatParams

LAYOUT = [("w", (3, 4)), ("b", (4,)), ("emb", (5, 2)), ("g", (2,))]


def make(seed=0, dtype=np.float64):
    p = FlatParams(LAYOUT, np, dtype)
    r = np.random.default_rng(seed)
    p.data[:] = r.normal(size=p.size)
    return p, r


def test_flat_params_views_share_buffers():
    p, _ = make()
    assert p.names == ["w", "b", "emb", "g"]
    assert p.spans["b"] == (12, 4) and p.size == 12 + 4 + 10 + 2
    p.views["b"][:] = 7
    assert np.all(p.data[12:16] == 7)
    p.grad_views["emb"][:] = 1
    assert p.grad.sum() == 10
    p.zero_grad()
    assert not p.grad.any()
    np.testing.assert_array_equal(p.decay_mask(), np.r_[np.ones(12), np.zeros(4), np.ones(10), np.zeros(2)])


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_reference(wd):
    p, r = make(1)
    opt = AdamW(p, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    ref = {n: p.views[n].copy() for n in p.names}
    m = {n: np.zeros_like(v) for n, v in ref.items()}
    v2 = {n: np.zeros_like(v) for n, v in ref.items()}
    for t in range(1, 6):
        p.grad[:] = r.normal(size=p.size)
        lr = 1e-2 * t
        for n in p.names:
            g = p.grad_views[n]
            if ref[n].ndim >= 2:  # decoupled decay on matrices and embeddings only
                ref[n] = ref[n] * (1 - lr * wd)
            m[n] = 0.9 * m[n] + 0.1 * g
            v2[n] = 0.95 * v2[n] + 0.05 * g * g
            mh, vh = m[n] / (1 - 0.9 ** t), v2[n] / (1 - 0.95 ** t)
            ref[n] = ref[n] - lr * mh / (np.sqrt(vh) + 1e-8)
        opt.step(lr)
        for n in p.names:
            np.testing.assert_allclose(p.views[n], ref[n], rtol=1e-12, atol=1e-14)


def test_adamw_no_decay_on_1d_params():
    p, _ = make(2)
    before = p.data.copy()
    opt = AdamW(p, lr=0.1, weight_decay=0.5)
    opt.step()  # zero gradient: only weight decay moves anything
    assert np.all(p.views["b"] == before[12:16]) and np.all(p.views["g"] == before[-2:])
    np.testing.assert_allclose(p.views["w"].ravel(), before[:12] * (1 - 0.05))


def test_adamw_delta_and_state_roundtrip():
    p, r = make(3)
    q, _ = make(3)
    a, b = AdamW(p, lr=1e-2, weight_decay=0.1), AdamW(q, lr=1e-2, weight_decay=0.1)
    g = r.normal(size=p.size)
    p.grad[:] = g
    q.grad[:] = g
    a.step()
    q.data += b.delta()
    np.testing.assert_array_equal(p.data, q.data)
    c = AdamW(q, lr=1e-2, weight_decay=0.1)
    c.load_state_dict({k: np.array(v) for k, v in b.state_dict().items()})
    assert c.t == 1
    a.step()
    c.step()
    np.testing.assert_array_equal(p.data, q.data)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_reference(nesterov):
    p, r = make(4)
    opt = SGD(p, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    w, buf = p.data.copy(), np.zeros(p.size)
    mask = p.decay_mask()
    for _ in range(4):
        p.grad[:] = r.normal(size=p.size)
        g = p.grad + 0.01 * mask * w
        buf = 0.9 * buf + g
        w = w - 0.1 * (g + 0.9 * buf if nesterov else buf)
        opt.step()
        np.testing.assert_allclose(p.data, w, rtol=1e-13)
    s = SGD(p, lr=0.1, momentum=0.9, nesterov=nesterov)
    s.load_state_dict(opt.state_dict())
    np.testing.assert_array_equal(s.buf, opt.buf)
    assert s.t == 4


def test_clip_grad_norm():
    g = np.array([3.0, 4.0])
    assert clip_grad_norm(g, 10.0) == 5.0 and np.all(g == [3.0, 4.0])
    assert clip_grad_norm(g, 1.0) == 5.0
    assert abs(np.linalg.norm(g) - 1.0) < 1e-6
    g32 = np.ones(100, np.float32)
    clip_grad_norm(g32, 0.0)
    assert g32.dtype == np.float32 and np.all(g32 == 1)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 100.0], ids=["no clip", "clipped", "under the limit"])
def test_step_from_device_scalars_equals_the_step(max_norm):
    """The captured step's AdamW (scalars and the clip's scale read from an array) against the
    eager one (clip_grad_norm on the gradient, then step), over 4 steps: bitwise in float64."""
    eager, r = make(seed=3)
    graphed, _ = make(seed=3)
    a = AdamW(eager, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    b = AdamW(graphed, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    hyper = np.zeros(4)
    for step in range(4):
        g = r.normal(size=eager.size)
        eager.grad[:], graphed.grad[:] = g, g
        clip_grad_norm(eager.grad, max_norm)
        a.step(lr=1e-2 / (step + 1))
        hyper[:] = b.next_scalars(lr=1e-2 / (step + 1))
        if max_norm:
            clip_factor(graphed.grad, max_norm, hyper[3:])
        b.step_from(hyper)
    np.testing.assert_array_equal(graphed.data, eager.data)
    np.testing.assert_array_equal(b.m, a.m)
    assert b.t == a.t == 4
    norm = math.sqrt(float(g @ g))
    assert hyper[3] == (max_norm / (norm + 1e-6) if 0 < max_norm < norm else 1.0)


def test_lr_schedule_shape():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))  # cosine falls
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert all(x == 0.1 for x in lrs[100:])


def test_float32_state_stays_float32():
    p, r = make(5, np.float32)
    p.grad[:] = r.normal(size=p.size)
    opt = AdamW(p, lr=1e-3, weight_decay=0.1)
    u = opt.delta()
    assert u.dtype == np.float32 and opt.m.dtype == np.float32 and opt.v.dtype == np.float32

"""llmpi.parallel.threaded: the batch split over threads gives the single-thread gradient and loss.

(ThreadedGrad has no on_block_done hook: the gradient is complete only after the
replicas' buffers are summed, when forward_backward returns.)
"""
import numpy as np
import pytest

from llmpi.config import ModelConfig
from llmpi.model.gpt import GPT
from llmpi.parallel.threaded import ThreadedGrad, blas_threads, chunk_bounds


def tiny(dtype, **kw):
    cfg = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype=dtype)
    cfg.update(kw)
    return ModelConfig(**cfg)


def batch(cfg, B, T=7, seed=0):
    r = np.random.default_rng(seed)
    return r.integers(0, cfg.vocab_size, (B, T)), r.integers(0, cfg.vocab_size, (B, T))


def reference(cfg, x, y, loss_scale):
    m = GPT(cfg, seed=3)
    m.params.zero_grad()
    _, loss, cache = m.forward(x, y)
    m.backward(cache, loss_scale)
    return loss, m.params.grad.copy()


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("B", [12, 3])
@pytest.mark.parametrize("n_threads", [2, 3])
def test_threaded_gradient_equals_single_thread(dtype, rtol, B, n_threads):
    cfg = tiny(dtype)
    x, y = batch(cfg, B)
    loss_ref, grad_ref = reference(cfg, x, y, 0.5)
    m = GPT(cfg, seed=3)
    with ThreadedGrad(m, n_threads) as tg:
        for _ in range(2):  # the second call checks the replicas' scratch grads are re-zeroed
            m.params.zero_grad()
            loss = tg.forward_backward(x, y, loss_scale=0.5)
            np.testing.assert_allclose(loss, loss_ref, rtol=rtol)
            atol = rtol * np.abs(grad_ref).max()  # elements that cancel to ~0 are compared absolutely
            np.testing.assert_allclose(m.params.grad, grad_ref, rtol=rtol, atol=atol)
    assert m.params.grad.dtype == np.dtype(dtype)


def test_adds_into_grad_and_shares_weights():
    cfg = tiny("float64")
    x, y = batch(cfg, 4)
    m = GPT(cfg, seed=3)
    tg = ThreadedGrad(m, 2)
    assert all(r.params.data is m.params.data for r in tg.replicas)
    assert all(r.params.grad is not m.params.grad for r in tg.replicas[1:])
    m.params.zero_grad()
    tg.forward_backward(x, y)
    once = m.params.grad.copy()
    tg.forward_backward(x, y)  # no zeroing: adds, like model.backward
    np.testing.assert_allclose(m.params.grad, 2 * once, rtol=1e-12)
    m.params.data *= 1.01  # the replicas see updated weights without a copy
    m.params.zero_grad()
    _, loss_ref, cache = m.forward(x, y)
    m.backward(cache)
    grad_ref = m.params.grad.copy()
    m.params.zero_grad()
    np.testing.assert_allclose(tg.forward_backward(x, y), loss_ref, rtol=1e-12)
    np.testing.assert_allclose(m.params.grad, grad_ref, rtol=1e-10, atol=1e-14)
    tg.close()


def test_one_thread_is_the_plain_path_and_chunking():
    cfg = tiny("float64")
    x, y = batch(cfg, 5)
    loss_ref, grad_ref = reference(cfg, x, y, 1.0)
    m = GPT(cfg, seed=3)
    tg = ThreadedGrad(m, 1)
    assert tg.pool is None and tg.replicas == [m]
    m.params.zero_grad()
    assert tg.forward_backward(x, y) == loss_ref
    np.testing.assert_array_equal(m.params.grad, grad_ref)
    assert chunk_bounds(12, 2) == [(0, 6), (6, 12)]
    assert chunk_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert chunk_bounds(2, 3) == [(0, 1), (1, 2)]  # never an empty chunk
    assert chunk_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]
    with pytest.raises(ValueError):
        ThreadedGrad(m, 0)


def test_more_threads_than_samples():
    cfg = tiny("float64")
    x, y = batch(cfg, 1)
    loss_ref, grad_ref = reference(cfg, x, y, 1.0)
    m = GPT(cfg, seed=3)
    with ThreadedGrad(m, 3) as tg:
        m.params.zero_grad()
        np.testing.assert_allclose(tg.forward_backward(x, y), loss_ref, rtol=1e-12)
    np.testing.assert_allclose(m.params.grad, grad_ref, rtol=1e-12)


def test_blas_threads_holds_then_restores():
    """Inside the block NumPy's OpenBLAS runs the asked-for thread count, after it the old one
    again (threadpoolctl-style lookup; skipped where NumPy's BLAS is not a findable OpenBLAS)."""
    from llmpi.parallel.threaded import _openblas_api
    api = _openblas_api()
    if api is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can find")
    set_fn, get_fn = api
    original = get_fn()
    set_fn(2)
    try:
        with blas_threads(1):
            inside = get_fn()
        assert inside == 1 and get_fn() == 2
        with pytest.raises(RuntimeError):
            with blas_threads(1):
                raise RuntimeError("the count comes back on an exception too")
        assert get_fn() == 2
    finally:
        set_fn(original)

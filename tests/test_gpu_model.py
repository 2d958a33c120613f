"""The whole GPT on the GPU (CuPy arrays, whatever ops the model dispatches to) against the same
weights on the CPU in float64: loss, logits and the flat gradient agree to float32 accuracy."""
import numpy as np
import pytest

from conftest import rel_error
from llmpi.backend import gpu_available
from llmpi.config import ModelConfig
from llmpi.model.gpt import GPT

pytestmark = pytest.mark.skipif(not gpu_available(), reason="no GPU")


@pytest.fixture
def cp():
    import cupy
    return cupy


def pair(cp, **kw):
    """(CPU float64 model, GPU float32 model) holding the same weights."""
    cfg = dict(vocab_size=67, block_size=40, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    ref = GPT(ModelConfig(dtype="float64", **cfg), seed=3)
    gpu = GPT(ModelConfig(dtype="float32", **cfg), xp=cp, seed=3)
    gpu.params.data[...] = cp.asarray(ref.params.data.astype(np.float32))
    ref.params.data[...] = gpu.params.data.get()  # both start from the same float32 values
    return ref, gpu


@pytest.mark.parametrize("B,T,kw", [(2, 7, {}), (1, 1, {}), (3, 33, {"n_head": 1, "n_embd": 64}),
                                    (2, 40, {"n_head": 2, "n_embd": 128, "vocab_size": 300})])
def test_loss_and_gradient_match_cpu(cp, B, T, kw):
    ref, gpu = pair(cp, **kw)
    r = np.random.default_rng(0)
    idx, tgt = r.integers(0, ref.cfg.vocab_size, (2, B, T))
    _, loss_ref, cache = ref.forward(idx, tgt)
    ref.params.zero_grad()
    ref.backward(cache, loss_scale=2.0)
    _, loss, cache = gpu.forward(cp.asarray(idx), cp.asarray(tgt))
    gpu.params.zero_grad()
    spans = []
    gpu.backward(cache, loss_scale=2.0, on_block_done=lambda lo, hi: spans.append((lo, hi)))
    assert abs(loss - loss_ref) < 1e-5 * loss_ref
    assert rel_error(gpu.params.grad.get(), ref.params.grad) < 1e-4
    for name in ref.params.names:
        assert rel_error(gpu.params.grad_views[name].get(), ref.params.grad_views[name]) < 1e-3, name
    assert sorted(spans)[0][0] == 0 and sorted(spans)[-1][1] == gpu.params.size


def test_logits_match_cpu(cp):
    ref, gpu = pair(cp)
    idx = np.random.default_rng(1).integers(0, ref.cfg.vocab_size, (2, 9))
    logits_ref, _, _ = ref.forward(idx)
    logits, _, _ = gpu.forward(cp.asarray(idx))
    assert rel_error(logits.get(), logits_ref) < 1e-5


def test_tf32_attention_tracks_cpu(cp, monkeypatch):
    """With TF32 allowed the attention runs on tensor cores (head size 16 here): loss and
    gradients stay within TF32 accuracy (10-bit mantissa inputs) of the float64 model."""
    monkeypatch.setenv("CUPY_TF32", "1")
    ref, gpu = pair(cp, n_head=2, n_embd=32)
    r = np.random.default_rng(2)
    idx, tgt = r.integers(0, ref.cfg.vocab_size, (2, 3, 40))
    _, loss_ref, cache = ref.forward(idx, tgt)
    ref.params.zero_grad()
    ref.backward(cache)
    _, loss, cache = gpu.forward(cp.asarray(idx), cp.asarray(tgt))
    assert cache["blocks"][0][2][-1] == "tf32", "attention did not take the TF32 tensor-core path"
    gpu.params.zero_grad()
    gpu.backward(cache)
    assert abs(loss - loss_ref) < 2e-3 * loss_ref
    assert rel_error(gpu.params.grad.get(), ref.params.grad) < 2e-2


def test_bf16_matmuls_track_cpu(cp):
    """model.dtype = "bf16": bf16 activations between the kernels, bf16 GEMMs and attention
    products, float32 weights, gradients and statistics; loss within 1% and gradients within a
    few percent of the float64 model."""
    ref, _ = pair(cp)
    cfg = dict(vocab_size=67, block_size=40, n_layer=2, n_head=2, n_embd=32)
    gpu = GPT(ModelConfig(dtype="bf16", **cfg), xp=cp, seed=3)
    from llmpi.gpu.ops import BF16_OPS
    assert gpu.ops is BF16_OPS
    gpu.params.data[...] = cp.asarray(ref.params.data.astype(np.float32))
    r = np.random.default_rng(4)
    idx, tgt = r.integers(0, ref.cfg.vocab_size, (2, 3, 40))
    _, loss_ref, cache = ref.forward(idx, tgt)
    ref.params.zero_grad()
    ref.backward(cache)
    _, loss, cache = gpu.forward(cp.asarray(idx), cp.asarray(tgt))
    assert cache["blocks"][0][2][-1] == "bf16io", "attention did not take the bf16-storage tensor-core path"
    assert cache["blocks"][0][4][0].dtype == cp.uint16, "the residual stream is not bf16"
    gpu.params.zero_grad()
    gpu.backward(cache)
    assert abs(loss - loss_ref) < 1e-2 * loss_ref
    assert rel_error(gpu.params.grad.get(), ref.params.grad) < 5e-2
    # model.recompute = "gelu+ln": the same bits (our kernels have no atomics; cuBLAS is
    # reproducible run to run on one GPU)
    rebuilt = GPT(ModelConfig(dtype="bf16", recompute="gelu+ln", **cfg), xp=cp, seed=3)
    rebuilt.params.data[...] = gpu.params.data
    _, loss_rebuilt, cache = rebuilt.forward(cp.asarray(idx), cp.asarray(tgt))
    rebuilt.params.zero_grad()
    rebuilt.backward(cache)
    assert float(loss_rebuilt) == float(loss)
    assert (rebuilt.params.grad == gpu.params.grad).all()

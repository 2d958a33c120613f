"""Every fused CPU kernel (llmpi.cpu) against its NumPy twin (llmpi.model.layers), in float32 and
float64 on odd shapes; the float32 exp against float64; the op tables alike; the whole model
on both tables. Skips without numba."""
import os
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

from llmpi import ops as op_select  # noqa: E402
from llmpi.config import ModelConfig  # noqa: E402
from llmpi.cpu import jit  # noqa: E402
from llmpi.cpu.ops import FUSED_OPS  # noqa: E402
from llmpi.errors import UserError  # noqa: E402
from llmpi.model.gpt import GPT  # noqa: E402
from llmpi.model.layers import adamw, attention, crossentropy, gelu, gradnorm, layernorm  # noqa: E402
from llmpi.model.ops import LAYER_OPS  # noqa: E402
from llmpi.training import metrics  # noqa: E402

from cli import REPO, run, single_process_only  # noqa: E402

DTYPES = (np.float32, np.float64)
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-11, atol=1e-12)}


def rand(r, dtype, *shape):
    return r.standard_normal(shape).astype(dtype)


def close(a, b, dtype):
    np.testing.assert_allclose(a, b, **TOL[dtype])


def test_tables_have_the_same_entries():
    assert sorted(vars(FUSED_OPS)) == sorted(vars(LAYER_OPS))


def test_exp_against_float64():
    x = np.linspace(-30, 30, 200_001).astype(np.float32)
    out = np.empty_like(x)
    jit.exp_array(x, out)
    ref = np.exp(x.astype(np.float64))
    assert (np.abs(out - ref) / ref).max() < 2 * np.finfo(np.float32).eps
    special = np.array([np.nan, -np.inf, np.inf, 0.0, -100.0], np.float32)
    jit.exp_array(special, out[:5])
    assert np.isnan(out[0]) and list(out[1:5]) == [0.0, np.inf, 1.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu(dtype):
    r = np.random.default_rng(1)
    pre, bias, dout = rand(r, dtype, 3, 5, 37) * 3, rand(r, dtype, 37), rand(r, dtype, 3, 5, 37)
    want, wc = gelu.bias_forward(pre.copy(), bias)
    got, gc = FUSED_OPS.bias_gelu.forward(pre.copy(), bias)
    close(got, want, dtype)
    close(gc, wc, dtype)
    close(FUSED_OPS.bias_gelu.backward(dout, gc), gelu.backward(dout, wc), dtype)
    assert np.array_equal(FUSED_OPS.bias_gelu.recompute(gc), got)  # model.recompute = "gelu": the same bits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", (False, True))
def test_layernorm(dtype, residual):
    r = np.random.default_rng(2)
    x, w, b, dout = rand(r, dtype, 2, 7, 29) * 2 + 1, rand(r, dtype, 29), rand(r, dtype, 29), rand(r, dtype, 2, 7, 29)
    want, wc = layernorm.forward(x, w, b)
    got, gc = FUSED_OPS.layernorm.forward(x, w, b)
    close(got, want, dtype)
    assert np.array_equal(FUSED_OPS.layernorm.recompute(gc, b).reshape(x.shape), got)  # model.recompute
    assert np.array_equal(layernorm.recompute(wc, b), want)
    grads = [[np.zeros(29, dtype), np.zeros(29, dtype)] for _ in range(2)]
    res = rand(r, dtype, 2, 7, 29)
    dx_want = layernorm.backward(dout, wc, *grads[0], dx=res.copy() if residual else None)
    dx_got = FUSED_OPS.layernorm.backward(dout, gc, *grads[1], dx=res.copy() if residual else None)
    close(dx_got, dx_want, dtype)
    close(grads[1][0], grads[0][0], dtype)
    close(grads[1][1], grads[0][1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention(dtype):
    r = np.random.default_rng(3)
    B, T, NH, HS = 2, 13, 3, 5
    qkv, dout = rand(r, dtype, B, T, 3 * NH * HS), rand(r, dtype, B, T, NH * HS)
    want, wc = attention.forward(qkv, NH)
    got, gc = FUSED_OPS.attention.forward(qkv, NH)
    close(got, want, dtype)
    close(FUSED_OPS.attention.backward(dout, gc), attention.backward(dout, wc), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_crossentropy(dtype):
    r = np.random.default_rng(4)
    logits, y = rand(r, dtype, 3, 7, 11) * 4, r.integers(0, 11, (3, 7))
    want, wc = crossentropy.forward(logits.copy(), y)
    got, gc = FUSED_OPS.crossentropy.forward(logits.copy(), y)
    assert got == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-12)
    close(FUSED_OPS.crossentropy.backward(gc, 0.5), crossentropy.backward(wc, 0.5), dtype)
    assert FUSED_OPS.crossentropy.loss(logits.copy(), y) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", (True, False))
def test_adamw_and_gradnorm(dtype, in_place):
    r = np.random.default_rng(5)
    n = 1001
    p, g, m = rand(r, dtype, n), rand(r, dtype, n), rand(r, dtype, n)
    v, mask = np.abs(rand(r, dtype, n)), (r.random(n) < 0.5).astype(dtype)
    state = [[a.copy() for a in (p, m, v)] for _ in range(2)]
    args = (1e-2, 0.9, 0.99, 1e-8, 0.1, 3)
    outs = [None if in_place else np.empty_like(p) for _ in range(2)]
    want = adamw.update(state[0][0], g, state[0][1], state[0][2], mask, *args, grad_scale=0.5, out=outs[0])
    got = FUSED_OPS.adamw_update(state[1][0], g, state[1][1], state[1][2], mask, *args, grad_scale=0.5, out=outs[1])
    close(got, want, dtype)
    for a, b in zip(state[1], state[0]):
        close(a, b, dtype)
    assert FUSED_OPS.sumsq(g) == pytest.approx(gradnorm.sumsq(g), rel=1e-5)
    g1, g2 = g.copy(), g.copy()
    assert FUSED_OPS.clip_grad_norm(g1, 1.0) == pytest.approx(gradnorm.clip_grad_norm(g2, 1.0), rel=1e-5)
    close(g1, g2, dtype)


@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_model_on_both_tables(dtype):
    cfg = ModelConfig(vocab_size=23, block_size=11, n_layer=2, n_head=2, n_embd=14, dtype=dtype)
    r = np.random.default_rng(6)
    x, y = r.integers(0, 23, (3, 11)), r.integers(0, 23, (3, 11))
    results = []
    for ops in (LAYER_OPS, FUSED_OPS):
        m = GPT(cfg, seed=0, ops=ops)
        m.params.zero_grad()
        _, loss, cache = m.forward(x, y)
        m.backward(cache)
        results.append((loss, m.params.grad.copy()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5 if dtype == "float32" else 1e-12)
    close(results[1][1], results[0][1], np.dtype(dtype).type)


def test_select_cpu_kernels():
    try:
        assert op_select.select_cpu_kernels("fused") == "fused"
        assert op_select.op_table(np, "float32") is FUSED_OPS
        assert op_select.op_table(np, "bf16") is FUSED_OPS
        assert op_select.select_cpu_kernels("numpy") == "numpy"
        assert op_select.op_table(np, "float32") is LAYER_OPS
    finally:
        op_select.select_cpu_kernels("numpy")


@single_process_only
def test_trainer_fused_matches_numpy(tmp_path):
    """`python -m llmpi.train` on 2 ranks with train.cpu_kernels fused vs numpy: the same losses to
    float32 rounding (the other trainer tests run numpy, tests/cli.py)."""
    corpus = str(tmp_path / "tiny.h5")
    run(["-m", "llmpi.data", "prepare", "--input", os.path.join(REPO, "llmpi", "cpu"), "--out", corpus], check=True)
    tiny = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2", "--set",
            "model.block_size=16", "--set", "train.batch_size=8", "--set", "train.max_iters=6", "--set",
            "train.eval_interval=6", "--set", "train.eval_iters=2", "--set", f"data.path={corpus}"]
    losses = {}
    for kernels in ("numpy", "fused"):
        run(["-m", "llmpi.train", *tiny, "--run-name", kernels, "--set", f"train.cpu_kernels={kernels}"], np=2,
            cwd=str(tmp_path), timeout=180, check=True)
        losses[kernels] = metrics.read(str(tmp_path / "runs" / kernels / "metrics.h5"))["steps"]["loss"]
    np.testing.assert_allclose(losses["fused"], losses["numpy"], rtol=1e-4)


def test_without_numba_auto_falls_back_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llmpi.cpu.ops", None)  # what a missing numba makes of the import
    try:
        assert op_select.select_cpu_kernels("auto") == "numpy"
        assert op_select.op_table(np, "float32") is LAYER_OPS
        assert capsys.readouterr().out.count("\n") == 1
        with pytest.raises(UserError, match="needs numba"):
            op_select.select_cpu_kernels("fused")
        with pytest.raises(UserError, match="allowed"):
            op_select.select_cpu_kernels("fast")
    finally:
        op_select.select_cpu_kernels("numpy")

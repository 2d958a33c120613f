"""The bf16-activation entry points of kernels/*.cu (model.dtype = "bf16": activations stored as
bf16 between kernels) against the float64 NumPy layers on the same bf16 values, on the GPU (skips
with "no GPU" without one) and on the CPU kernel emulator, like tests/test_kernels.py.

Inputs are random floats rounded to bf16; the references compute on those exact values. Where the
kernel's float32 result is rounded once to bf16, the check is against the reference within
BF16_TOL (rel_error: max abs diff / max abs; one bf16 rounding is at most 2^-9 relative, and a
LayerNorm output or a GELU near its minimum loses a little more); where the output is a float32
sum of exact bf16 values (the gradients of the weights), within FLOAT_TOL; where the kernel adds
two values in float32 and rounds once, the bits must equal that rounding done here."""
import numpy as np
import pytest

import kernel_emulator
from conftest import rel_error
from llmpi.backend import to_host
from llmpi.gpu import attention as gpu_attention, attention_tc as gpu_attention_tc
from llmpi.gpu import bf16 as gpu_bf16, bias as gpu_bias, cast as gpu_cast, classifier as gpu_classifier
from llmpi.gpu import embedding as gpu_embedding, gelu as gpu_gelu, layernorm as gpu_layernorm
from llmpi.gpu import residual as gpu_residual
from llmpi.model.layers import attention, crossentropy, embedding, gelu, layernorm

BF16_TOL = 1e-2
FLOAT_TOL = 1e-5
bits_of = kernel_emulator.bf16_bits


def values(bits):
    """bf16 bit patterns (host or device) -> their float64 values."""
    return (np.asarray(to_host(bits)).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def bf16_input(cp, r, *shape, scale=1.0, shift=0.0):
    """-> (device bf16 array, its float64 values) of random normals rounded to bf16."""
    b = bits_of(r.standard_normal(shape) * scale + shift)
    return cp.asarray(b), values(b)


def close(got, ref, tol):
    got = to_host(got)
    got = values(got) if got.dtype == np.uint16 else got
    assert rel_error(got, ref) < tol, rel_error(got, ref)


def test_cast_round_trip(cp):
    r = np.random.default_rng(0)
    xb, xv = bf16_input(cp, r, 3, 37)
    wide = gpu_cast.from_bf16(xb)
    assert wide.dtype == np.float32 and (to_host(wide) == xv).all()
    assert (to_host(gpu_cast.to_bf16(wide)) == to_host(xb)).all()


@pytest.mark.parametrize("B,T,V,C", [(1, 1, 5, 72), (2, 7, 50, 33)])
def test_embedding_bf16(cp, B, T, V, C):
    r = np.random.default_rng(1)
    wte, wpe = r.standard_normal((V, C)).astype(np.float32), r.standard_normal((T + 3, C)).astype(np.float32)
    idx = r.integers(0, min(V, 4), (B, T))
    out, cache = gpu_embedding.forward_bf16(cp.asarray(wte), cp.asarray(wpe), cp.asarray(idx))
    ref, rcache = embedding.forward(wte.astype(np.float64), wpe.astype(np.float64), idx)
    assert out.dtype == np.uint16 and (to_host(out) == bits_of(ref)).all()  # one float32 add, one rounding
    doutb, doutv = bf16_input(cp, r, B, T, C)
    grads = [cp.asarray(np.ones((V, C), np.float32)), cp.asarray(np.ones((T + 3, C), np.float32))]
    gpu_embedding.backward(doutb, cache, *grads)
    rgrads = [np.ones((V, C)), np.ones((T + 3, C))]
    embedding.backward(doutv, rcache, *rgrads)
    close(grads[0], rgrads[0], FLOAT_TOL)
    close(grads[1], rgrads[1], FLOAT_TOL)


@pytest.mark.parametrize("B,T,C", [(1, 1, 72), (2, 7, 72), (3, 5, 33)])
def test_layernorm_bf16(cp, B, T, C):
    r = np.random.default_rng(2)
    xb, xv = bf16_input(cp, r, B, T, C, scale=3, shift=1)
    w, b = r.standard_normal(C).astype(np.float32), r.standard_normal(C).astype(np.float32)
    out, cache = gpu_layernorm.forward(xb, cp.asarray(w), cp.asarray(b))
    ref, rcache = layernorm.forward(xv, w.astype(np.float64), b.astype(np.float64))
    assert out.dtype == np.uint16
    close(out, ref, BF16_TOL)
    assert (to_host(gpu_layernorm.recompute(cache, cp.asarray(b))) == to_host(out)).all()  # model.recompute
    doutb, doutv = bf16_input(cp, r, B, T, C)
    dw, db = cp.asarray(np.ones(C, np.float32)), cp.asarray(np.ones(C, np.float32))
    rdw, rdb = np.ones(C), np.ones(C)
    dx = gpu_layernorm.backward(doutb, cache, dw, db)
    rdx = layernorm.backward(doutv, rcache, rdw, rdb)
    assert dx.dtype == np.uint16
    close(dx, rdx, BF16_TOL)
    close(dw, rdw, 1e-4)  # float32 sums over rows, of products with the float32 normalised x
    close(db, rdb, FLOAT_TOL)
    accb, accv = bf16_input(cp, r, B, T, C)  # the residual stream's gradient, bf16, added into
    gpu_layernorm.backward(doutb, cache, dw, db, dx=accb)
    close(accb, accv + rdx, BF16_TOL)


@pytest.mark.parametrize("B,T,C", [(2, 7, 72), (1, 3, 33)])
def test_residual_and_fused_residual_layernorm_bf16(cp, B, T, C):
    r = np.random.default_rng(3)
    (xb, xv), (fxb, fxv) = bf16_input(cp, r, B, T, C), bf16_input(cp, r, B, T, C)
    want = bits_of((xv.astype(np.float32) + fxv.astype(np.float32)))  # one float32 add, rounded once
    out, _ = gpu_residual.forward(xb, fxb.copy())
    assert out.dtype == np.uint16 and (to_host(out) == want).all()
    w, b = r.standard_normal(C).astype(np.float32), r.standard_normal(C).astype(np.float32)
    fx2 = fxb.copy()
    res, out, cache = gpu_layernorm.residual_forward(xb, fx2, cp.asarray(w), cp.asarray(b))
    assert res is fx2 and (to_host(res) == want).all()
    ref, _ = layernorm.forward(values(want), w.astype(np.float64), b.astype(np.float64))
    close(out, ref, BF16_TOL)
    assert (to_host(gpu_layernorm.recompute(cache, cp.asarray(b))) == to_host(out)).all()  # model.recompute
    alone, alone_cache = gpu_layernorm.forward(res, cp.asarray(w), cp.asarray(b))
    assert (to_host(alone) == to_host(out)).all()  # the fused kernel is the LayerNorm of the rounded sum
    assert (to_host(alone_cache[2]) == to_host(cache[2])).all()
    with pytest.raises(ValueError, match="bf16"):
        gpu_layernorm.residual_forward(cp.asarray(xv.astype(np.float32)), cp.asarray(fxv.astype(np.float32)),
                                       cp.asarray(w), cp.asarray(b))


@pytest.mark.parametrize("shape", [(2, 7, 4 * 72), (1, 3, 75)])
def test_bias_gelu_bf16(cp, shape):
    r = np.random.default_rng(4)
    preb, prev = bf16_input(cp, r, *shape, scale=2)
    bias = r.standard_normal(shape[-1]).astype(np.float32)
    out, cache = gpu_gelu.bias_forward(preb, cp.asarray(bias))
    rounded = bits_of(prev.astype(np.float32) + bias)
    assert cache is preb and (to_host(preb) == rounded).all()  # pre + bias kept in place, rounded once
    close(out, gelu.forward(values(rounded))[0], BF16_TOL)
    assert (to_host(gpu_gelu.recompute(cache)) == to_host(out)).all()  # model.recompute = "gelu"
    doutb, doutv = bf16_input(cp, r, *shape)
    dx = gpu_gelu.backward(doutb, cache)
    assert dx.dtype == np.uint16
    close(dx, gelu.backward(doutv, values(rounded)), BF16_TOL)


@pytest.mark.parametrize("OC", [37, 40])  # the scalar path only; the 8-wide path
def test_bias_add_and_grad_bf16(cp, OC):
    r = np.random.default_rng(5)
    N = 150  # rows over several partials (64 rows each)
    ob, ov = bf16_input(cp, r, N, OC)
    bias = r.standard_normal(OC).astype(np.float32)
    gpu_bias.add(ob, cp.asarray(bias))
    assert (to_host(ob) == bits_of(ov.astype(np.float32) + bias)).all()
    db = cp.asarray(np.ones(OC, np.float32))
    db2 = cp.asarray(np.ones(OC, np.float32))
    gpu_bias.grad(ob, db)
    gpu_bias.grad(ob, db2)
    close(db, 1 + values(ob).sum(axis=0), FLOAT_TOL)
    assert (to_host(db) == to_host(db2)).all()  # deterministic
    with pytest.raises(ValueError, match="bf16"):
        gpu_bias.add(cp.asarray(ov.astype(np.float32)), cp.asarray(bias))


@pytest.mark.parametrize("transa,transb", [(False, False), (True, False), (False, True)])
def test_matmul_writes_bf16(cp, transa, transb):
    r = np.random.default_rng(6)
    M, K, N = 9, 40, 23
    (ab, av), (bb, bv) = bf16_input(cp, r, *((K, M) if transa else (M, K))), bf16_input(cp, r, *((N, K) if transb else (K, N)))
    ref = (av.T if transa else av) @ (bv.T if transb else bv)
    got = gpu_bf16.matmul(ab, bb, transa=transa, transb=transb, out_dtype=np.uint16)
    assert got.dtype == np.uint16 and got.shape == (M, N)
    close(got, ref, BF16_TOL)


def test_classifier_on_bf16_logits(cp):
    """Losses in float32 from the bf16 logits' exact values, dlogits rounded to bf16 in their
    place, the padding columns untouched, and a loss scale applied to the bf16 dlogits."""
    r = np.random.default_rng(7)
    B, T, V, Vp = 2, 5, 37, 64
    fullb, fullv = bf16_input(cp, r, B * T, Vp, scale=3)
    targets = r.integers(0, V, (B, T))
    rloss, rcache = crossentropy.forward(fullv[:, :V].reshape(B, T, V).copy(), targets)
    rd = crossentropy.backward(rcache, 2.0)
    logits = fullb[:, :V].reshape(B, T, V)
    losses = gpu_classifier.losses(logits, cp.asarray(targets))
    assert abs(float(losses.mean()) - rloss) < FLOAT_TOL * rloss
    loss, cache = gpu_classifier.forward(logits, cp.asarray(targets))
    assert abs(loss - rloss) < FLOAT_TOL * rloss
    d = gpu_classifier.backward(cache, 2.0)
    assert d.dtype == np.uint16
    close(to_host(d), rd, BF16_TOL)
    assert (values(fullb)[:, V:] == fullv[:, V:]).all()


def misaligned(cp, a):
    """A C-contiguous copy of `a` that starts 2 bytes past a 16-byte boundary: the kernels' 8-wide
    paths need 16-byte aligned rows, so this runs their scalar paths on the same values."""
    flat = cp.empty(a.size + 8, dtype=a.dtype)
    out = flat[1:1 + a.size].reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("B,T,NH,HS", [(1, 9, 2, 16), (2, 70, 2, 32), (1, 65, 1, 64), (1, 9, 1, 40)])
def test_attention_on_bf16_storage(cp, B, T, NH, HS):
    """The bf16 tensor-core kernels reading and writing bf16 qkv, out, dout and dqkv (entry points
    *_bf16io_*): the forward has the bits of the same kernels on qkv widened to float32 with the
    output rounded after (the math is the same, only the loads and stores moved); the backward
    takes delta from the bf16 output, so it is within the bf16 attention tolerance (2e-2, as in
    test_kernels.py) of the float64 layer on the same values. HS 40 has no tensor-core entry
    point: the widened fallback."""
    r = np.random.default_rng(9)
    C = NH * HS
    (qkv_b, qkv), (dout_b, dout) = bf16_input(cp, r, B, T, 3 * C), bf16_input(cp, r, B, T, C)
    out, cache = gpu_attention.forward_bf16_storage(qkv_b, NH)
    assert out.dtype == np.uint16 and (cache[-1] == "bf16io") == (HS in gpu_attention_tc.HEAD_SIZES)
    widened, _ = gpu_attention.forward_bf16_where_possible(gpu_cast.from_bf16(qkv_b), NH)
    assert (to_host(out) == to_host(gpu_cast.to_bf16(widened))).all()
    ref, rcache = attention.forward(qkv, NH)
    close(out, ref, 2e-2)
    dqkv = gpu_attention.backward_bf16_storage(dout_b, cache)
    assert dqkv.dtype == np.uint16
    close(dqkv, attention.backward(dout, rcache), 2e-2)


def test_vector_and_scalar_paths_agree(cp):
    """C = 72 (a multiple of 8): 16-byte aligned arrays take the 8-wide paths, misaligned copies the
    scalar ones; the element-wise kernels give the same bits, the LayerNorm (whose sums run in
    another order) the same values to float32 rounding before the one bf16 rounding."""
    r = np.random.default_rng(8)
    (xb, _), (fxb, _), (db, _) = (bf16_input(cp, r, 3, 5, 72) for _ in range(3))
    w, b = cp.asarray(r.standard_normal(72).astype(np.float32)), cp.asarray(r.standard_normal(72).astype(np.float32))
    a = gpu_residual.forward(xb, fxb.copy())[0]
    m = gpu_residual.forward(misaligned(cp, xb), misaligned(cp, fxb))[0]
    assert (to_host(a) == to_host(m)).all()
    pre = gpu_gelu.bias_forward(xb.copy(), w)
    pre_m = gpu_gelu.bias_forward(misaligned(cp, xb), w)
    assert all((to_host(u) == to_host(v)).all() for u, v in zip(pre, pre_m))
    assert (to_host(gpu_gelu.recompute(pre[1])) == to_host(gpu_gelu.recompute(misaligned(cp, pre[1])))).all()
    assert (to_host(gpu_gelu.backward(db, xb)) == to_host(gpu_gelu.backward(misaligned(cp, db), misaligned(cp, xb)))).all()
    ln, cache = gpu_layernorm.forward(xb, w, b)
    ln_m, cache_m = gpu_layernorm.forward(misaligned(cp, xb), w, b)
    close(ln, values(ln_m), 5e-3)
    assert (to_host(gpu_layernorm.recompute(cache, b)) == to_host(ln)).all()  # of the 8-wide path's output
    res, ln2, _ = gpu_layernorm.residual_forward(xb, fxb.copy(), w, b)
    res_m, ln2_m, _ = gpu_layernorm.residual_forward(misaligned(cp, xb), misaligned(cp, fxb), w, b)
    assert (to_host(res) == to_host(res_m)).all()
    close(ln2, values(ln2_m), 5e-3)
    grads = [cp.asarray(np.zeros(72, np.float32)) for _ in range(4)]
    dx = gpu_layernorm.backward(db, cache, *grads[:2])
    dx_m = gpu_layernorm.backward(misaligned(cp, db), cache_m, *grads[2:])
    close(dx, values(dx_m), 5e-3)
    full = bits_of(r.standard_normal((6, 64)) * 3)
    t = cp.asarray(r.integers(0, 60, (2, 3)))
    la = gpu_classifier.losses(cp.asarray(full)[:, :60].reshape(2, 3, 60), t)
    lm = gpu_classifier.losses(misaligned(cp, cp.asarray(full))[:, :60].reshape(2, 3, 60), t)
    close(la, to_host(lm).astype(np.float64), FLOAT_TOL)


def test_wrappers_refuse_mixed_storage(cp):
    x = cp.asarray(np.zeros((2, 3, 8), np.float32))
    with pytest.raises(ValueError, match="one dtype"):
        gpu_residual.forward(x, cp.asarray(np.zeros((2, 3, 8), np.uint16)))
    with pytest.raises(ValueError, match="float32 or bf16"):
        gpu_layernorm.forward(x.astype(np.float64), cp.asarray(np.ones(8, np.float32)), cp.asarray(np.zeros(8, np.float32)))

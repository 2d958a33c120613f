"""Each CUDA kernel (through its wrapper in llmpi/gpu/) against its NumPy twin in llmpi/model/layers,
on shapes that are not multiples of the block sizes. Every such test runs twice: on the GPU
(skips with "no GPU" without one) and on the CPU kernel emulator (tests/kernel_emulator.py,
small shapes, single-process pass). The nvcc compile check and the wrapper/kernel consistency
checks run on any machine."""
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import kernel_emulator
from cli import single_process_only
from conftest import UNDER_MPI, rel_error
from llmpi.backend import address, to_host
from llmpi.gpu import adamw as gpu_adamw, attention as gpu_attention, attention_tc as gpu_attention_tc
from llmpi.gpu import cast as gpu_cast, classifier as gpu_classifier, embedding as gpu_embedding
from llmpi.gpu import gelu as gpu_gelu, gradnorm as gpu_gradnorm, layernorm as gpu_layernorm, loader
from llmpi.gpu import residual as gpu_residual
from llmpi.gpu.common import THREADS, launch
from llmpi.model.layers import adamw, attention, crossentropy, embedding, gelu, gradnorm, layernorm, residual
from llmpi.training.optim import AdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-5  # float32 kernels vs float64 references, as rel_error (max abs diff / max abs)


large = pytest.mark.large  # too slow for the CPU kernel emulator: GPU only


def f32(cp, a):
    return cp.asarray(np.asarray(a, np.float32))


def f64(a):
    return np.asarray(a, np.float64)


def close(got, ref, tol=TOL):
    got = got.get() if hasattr(got, "get") else got
    assert rel_error(got, ref) < tol, rel_error(got, ref)


# ---- CPU-only checks ------------------------------------------------------------------------

@single_process_only  # one compile of every kernel is enough; four ranks would compile them four times
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.skipif(os.environ.get("LLMPI_NVCC_CHECKED") == "1", reason="compiled by .ci/run's nvcc step")
def test_every_kernel_compiles_with_nvcc():
    r = subprocess.run(["bash", os.path.join(ROOT, ".ci", "nvcc_check.sh")], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout + r.stderr


def test_wrappers_name_existing_entry_points():
    """Every (file, kernel) the wrappers launch is an extern "C" __global__ of that file; a name
    ending in the storage suffix (f"name{suffix}", llmpi.gpu.common.storage) needs both entry points."""
    launches = set()
    for module in glob.glob(os.path.join(os.path.dirname(loader.__file__), "*.py")):
        with open(module) as f:
            for file, name, suffix in re.findall(r'launch\("(\w+\.cu)", f?"(\w+)(\{suffix\})?"', f.read()):
                launches |= {(file, name), (file, name + "_bf16")} if suffix else {(file, name)}
    assert len(launches) >= 30
    for file, name in launches:
        src = loader.source(file)
        assert re.search(r'extern "C" __global__ void (__launch_bounds__\([^)]*\)\s*)?' + name + r"\(",
                         src), (file, name)


def test_op_tables_alike_and_bf16_by_sharding():
    """The GPU tables have the layers' entries; bf16 takes bf16 activations unless the layers are
    tensor-parallel shards (whose all-reduces sum float32)."""
    from llmpi.gpu.ops import BF16_MATMUL_OPS, BF16_OPS, KERNEL_OPS
    from llmpi.model.ops import LAYER_OPS
    from llmpi.ops import op_table
    entries = sorted(vars(LAYER_OPS))
    assert all(sorted(vars(t)) == entries for t in (KERNEL_OPS, BF16_OPS, BF16_MATMUL_OPS))
    device = types.ModuleType("a_device_array_module")  # anything but NumPy
    assert op_table(device, "bf16") is BF16_OPS and BF16_OPS.activation_dtype == np.uint16
    assert op_table(device, "bf16", sharded=True) is BF16_MATMUL_OPS and BF16_MATMUL_OPS.activation_dtype is None
    assert op_table(device, "float32", sharded=True) is KERNEL_OPS


def test_kernel_dir_finds_sources():
    assert os.path.isfile(os.path.join(loader.kernel_dir(), "attention.cu"))


def test_sources_paste_their_headers():
    """NVRTC gets one string: each local #include replaced by the header's text (so CuPy's cache,
    keyed on that string, sees a header change)."""
    src = loader.source("layernorm.cu")
    assert '#include "' not in src and "#define LLMPI_BF16_CUH" in src


def test_wrappers_reject_wrong_dtype_or_layout():
    with pytest.raises(ValueError, match="float32"):
        gpu_gelu.forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="strided"):
        gpu_gelu.forward(np.zeros((3, 4), np.float32).T)
    with pytest.raises(ValueError, match="HS <= 128"):
        gpu_attention.forward(np.zeros((1, 2, 3 * 256), np.float32), 1)


# ---- kernels vs references ------------------------------------------------------------------

@pytest.mark.parametrize("B,T,V,C", [(1, 1, 5, 72), (2, 7, 50, 72), pytest.param(3, 65, 300, 768, marks=large)])
def test_embedding(cp, B, T, V, C):
    r = np.random.default_rng(0)
    wte, wpe = r.standard_normal((V, C)), r.standard_normal((T + 3, C))
    idx = r.integers(0, min(V, 4), (B, T))  # few distinct tokens: long runs in the scatter-add
    out, cache = gpu_embedding.forward(f32(cp, wte), f32(cp, wpe), cp.asarray(idx))
    ref, rcache = embedding.forward(wte, wpe, idx)
    close(out, ref)
    dout = r.standard_normal((B, T, C))
    grads = [f32(cp, np.ones_like(wte)), f32(cp, np.ones_like(wpe))]
    gpu_embedding.backward(f32(cp, dout), cache, *grads)
    rgrads = [np.ones_like(wte), np.ones_like(wpe)]
    embedding.backward(dout, rcache, *rgrads)
    close(grads[0], rgrads[0], 1e-4)
    close(grads[1], rgrads[1], 1e-4)
    again = [f32(cp, np.ones_like(wte)), f32(cp, np.ones_like(wpe))]
    gpu_embedding.backward(f32(cp, dout), cache, *again)
    assert all(bool((a == g).all()) for a, g in zip(again, grads)), "scatter-add not deterministic"


@pytest.mark.parametrize("B,T,C", [(1, 1, 72), (2, 7, 72), pytest.param(1, 129, 768, marks=large), (3, 65, 33)])
def test_layernorm(cp, B, T, C):
    r = np.random.default_rng(1)
    x, w, b = r.standard_normal((B, T, C)) * 3 + 1, r.standard_normal(C), r.standard_normal(C)
    out, cache = gpu_layernorm.forward(f32(cp, x), f32(cp, w), f32(cp, b))
    ref, rcache = layernorm.forward(x, w, b)
    close(out, ref, 1e-4)
    assert (to_host(gpu_layernorm.recompute(cache, f32(cp, b))) == to_host(out)).all()  # model.recompute
    dout = r.standard_normal((B, T, C))
    dw, db = f32(cp, np.ones(C)), f32(cp, np.ones(C))
    rdw, rdb = np.ones(C), np.ones(C)
    dx = gpu_layernorm.backward(f32(cp, dout), cache, dw, db)
    rdx = layernorm.backward(dout, rcache, rdw, rdb)
    close(dx, rdx, 1e-4)
    close(dw, rdw, 1e-4)
    close(db, rdb, 1e-4)
    acc = f32(cp, np.full((B, T, C), 2.0))
    gpu_layernorm.backward(f32(cp, dout), cache, dw, db, dx=acc)
    close(acc, rdx + 2.0, 1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 4 * 72), (2, 7, 4 * 72), (1, 3, 75), pytest.param((1, 65, 4 * 768), marks=large)])
def test_gelu_and_bias_gelu(cp, shape):
    r = np.random.default_rng(2)
    x, dout, b = r.standard_normal(shape) * 2, r.standard_normal(shape), r.standard_normal(shape[-1])
    out, cache = gpu_gelu.forward(f32(cp, x))
    close(out, gelu.forward(x)[0])
    close(gpu_gelu.backward(f32(cp, dout), cache), gelu.backward(dout, x))
    pre = f32(cp, x)
    out, cache = gpu_gelu.bias_forward(pre, f32(cp, b))
    close(pre, x + b)
    close(out, gelu.forward(x + b)[0])
    assert (to_host(gpu_gelu.recompute(cache)) == to_host(out)).all()  # model.recompute = "gelu"


def test_residual(cp):
    r = np.random.default_rng(3)
    x, fx = r.standard_normal((2, 7, 72)), r.standard_normal((2, 7, 72))
    out, _ = gpu_residual.forward(f32(cp, x), f32(cp, fx))
    close(out, residual.forward(x, fx.copy())[0])


def test_attention_precision_follows_tf32_unless_asked(monkeypatch):
    qkv = np.zeros((1, 3, 3 * 64), np.float32)
    monkeypatch.setenv("CUPY_TF32", "0")
    assert gpu_attention.choose_precision(64, qkv) == "fp32"
    monkeypatch.setenv("CUPY_TF32", "1")
    assert gpu_attention.choose_precision(64, qkv) == "tf32"
    assert gpu_attention.choose_precision(40, qkv) == "fp32"  # no tensor-core entry point for this head size
    assert gpu_attention.choose_precision(64, qkv.reshape(-1)[1:]) == "fp32"  # rows not 16-byte aligned
    assert gpu_attention.choose_precision(64, qkv, "bf16") == "bf16"
    with pytest.raises(ValueError, match="head size in"):
        gpu_attention.choose_precision(40, qkv, "bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        gpu_attention.choose_precision(64, qkv, "fp16")


ATTENTION_SHAPES = [(1, 1, 1, 16), (2, 7, 3, 16), (1, 65, 2, 64), pytest.param(1, 129, 2, 64, marks=large),
                    pytest.param(2, 40, 1, 128, marks=large), (1, 33, 2, 40), (2, 70, 2, 32),
                    pytest.param(1, 200, 1, 64, marks=large)]
# rel. error allowed: float32 on CUDA cores; TF32 inputs (10-bit mantissa); bf16 inputs and
# probabilities (8-bit mantissa)
ATTENTION_TOLERANCE = {"fp32": 1e-4, "tf32": 3e-3, "bf16": 2e-2}


@pytest.mark.parametrize("precision", gpu_attention.PRECISIONS)
@pytest.mark.parametrize("B,T,NH,HS", ATTENTION_SHAPES)
def test_attention(cp, precision, B, T, NH, HS):
    """fp32: attention.cu on CUDA cores; tf32 and bf16: attention_tc.cu where the head size has
    entry points (others fall back to CUDA cores)."""
    if HS not in gpu_attention_tc.HEAD_SIZES:
        precision = "fp32"
    tol = ATTENTION_TOLERANCE[precision]
    r = np.random.default_rng(4)
    C = NH * HS
    qkv, dout = r.standard_normal((B, T, 3 * C)), r.standard_normal((B, T, C))
    out, cache = gpu_attention.forward(f32(cp, qkv), NH, precision=precision)
    assert cache[-1] == precision
    ref, rcache = attention.forward(qkv, NH)
    close(out, ref, tol)
    lse_ref = np.log(np.exp((qkv[..., :C].reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
                             @ qkv[..., C:2 * C].reshape(B, T, NH, HS).transpose(0, 2, 3, 1))
                            / math.sqrt(HS) + np.triu(np.full((T, T), -np.inf), 1)).sum(-1))
    close(cache[2], lse_ref, tol)
    dqkv = gpu_attention.backward(f32(cp, dout), cache)
    close(dqkv, attention.backward(dout, rcache), tol)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tensor_core_backward_takes_an_unaligned_dout(cp, precision):
    """A forward on tensor cores keeps its backward there even when dout's rows are not 16-byte
    aligned (it used to fall back to CUDA cores, mixing fp32 scores with the tensor-core lse)."""
    B, T, NH, HS = 1, 9, 2, 16
    r = np.random.default_rng(6)
    qkv = f32(cp, r.standard_normal((B, T, 3 * NH * HS)))
    out, cache = gpu_attention.forward(qkv, NH, precision=precision)
    dout = r.standard_normal((B, T, NH * HS))
    spare = cp.zeros(dout.size + 1, cp.float32)
    spare[1:] = f32(cp, dout).reshape(-1)
    unaligned = spare[1:].reshape(dout.shape)
    assert address(unaligned) % 16
    np.testing.assert_array_equal(to_host(gpu_attention.backward(unaligned, cache)),
                                  to_host(gpu_attention.backward(f32(cp, dout), cache)))


@pytest.mark.parametrize("B,T,V", [(1, 1, 5), (2, 7, 65), pytest.param(2, 33, 1000, marks=large), pytest.param(1, 4, 50257, marks=large)])
def test_crossentropy(cp, B, T, V):
    r = np.random.default_rng(5)
    logits, targets = r.standard_normal((B, T, V)) * 4, r.integers(0, V, (B, T))
    rloss, rcache = crossentropy.forward(logits.copy(), targets)
    rd = crossentropy.backward(rcache, 3.0)
    lg = f32(cp, logits)
    losses = gpu_classifier.losses(lg, cp.asarray(targets))
    close(lg, logits)  # evaluation leaves the logits alone
    assert abs(float(losses.mean()) - rloss) < 1e-5 * max(1.0, rloss)
    loss, cache = gpu_classifier.forward(lg, cp.asarray(targets))
    assert abs(loss - rloss) < 1e-5 * max(1.0, rloss)
    close(gpu_classifier.backward(cache, 3.0), rd, 1e-4)


def _host_adamw(p, g, mask, steps, **kw):
    params = types.SimpleNamespace(data=p.copy(), grad=g, xp=np, dtype=p.dtype, decay_mask=lambda: mask)
    opt = AdamW(params, **kw)
    for _ in range(steps):
        u = opt.delta()
        params.data += u
    return params.data, u


@pytest.mark.parametrize("n", [1, 1000, pytest.param(300_001, marks=large)])
def test_adamw(cp, n):
    r = np.random.default_rng(6)
    p, g, mask = r.standard_normal(n), r.standard_normal(n), (r.random(n) < 0.5).astype(float)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    dp, dg, dm = f32(cp, p), f32(cp, g), f32(cp, mask)
    m, v = cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
    steps = 3
    for t in range(1, steps):
        gpu_adamw.update(dp, dg, m, v, dm, kw["lr"], 0.9, 0.95, 1e-8, 0.1, t)
    delta = cp.empty(n, cp.float32)
    before = dp.copy()
    gpu_adamw.update(dp, dg, m.copy(), v.copy(), dm, kw["lr"], 0.9, 0.95, 1e-8, 0.1, steps,
                         out=delta)
    assert bool((dp == before).all())
    gpu_adamw.update(dp, dg, m, v, dm, kw["lr"], 0.9, 0.95, 1e-8, 0.1, steps)
    ref_p, ref_u = _host_adamw(p, g, mask, steps, **kw)
    close(dp, ref_p, 1e-5)
    close(delta, ref_u, 1e-4)


@large  # its first pass always runs NORM_BLOCKS blocks
@pytest.mark.parametrize("n", [1, 255, 1_000_003])
def test_grad_norm(cp, n):
    r = np.random.default_rng(7)
    g = r.standard_normal(n)
    dg = f32(cp, g)
    ref = float((g.astype(np.float32).astype(np.float64) ** 2).sum())
    got = float(gpu_gradnorm.sumsq(dg))
    assert abs(got - ref) <= 1e-9 * ref
    assert float(gpu_gradnorm.sumsq(dg)) == got  # same bits every time
    norm = gpu_gradnorm.clip_grad_norm(dg, 0.5 * math.sqrt(ref))
    assert abs(norm - math.sqrt(ref)) <= 1e-6 * norm
    clipped = 0.5 * math.sqrt(ref) * norm / (norm + 1e-6)  # the clip's 1e-6 guard, as on the CPU
    assert abs(math.sqrt(float(gpu_gradnorm.sumsq(dg))) - clipped) < 1e-5 * clipped
    factor, limit = cp.ones(1, cp.float32), 0.25 * math.sqrt(ref)
    gpu_gradnorm.clip_factor(dg, limit, factor)  # the device-side clip of a captured step
    assert abs(float(factor[0]) - limit / (clipped + 1e-6)) < 1e-5 * float(factor[0])


@pytest.mark.parametrize("n", [1, 1000])
def test_sumsq_kernels_on_a_few_blocks(cp, n):
    """sumsq_partial and sumsq_finish on 3 blocks, for the emulator (the wrapper's fixed 1024 blocks are
    too many for it): the kernels take any grid (a grid-stride loop, then one block over the partials)."""
    x = np.random.default_rng(9).standard_normal(n).astype(np.float32)
    partial, total = cp.zeros(3, dtype=cp.float64), cp.zeros(1, dtype=cp.float64)
    launch("gradnorm.cu", "sumsq_partial", (3,), (THREADS,), partial, f32(cp, x), np.int32(n))
    launch("gradnorm.cu", "sumsq_finish", (1,), (THREADS,), total, partial, np.int32(3))
    ref = float(x.astype(np.float64) @ x.astype(np.float64))
    assert abs(float(total[0]) - ref) <= 1e-12 * ref
    assert abs(float(partial.sum()) - ref) <= 1e-12 * ref


@pytest.mark.parametrize("n", [1, 1000])
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6], ids=["no clip", "clipped", "under the limit"])
def test_adamw_from_device_scalars(cp, n, max_norm):
    """A captured step's update: clip_factor writes the clip's scale on the device and
    adamw_update_from reads it with lr and the bias corrections from memory, against the NumPy
    twins on the same float32 inputs (and, bitwise, against the kernel with those as arguments)."""
    r = np.random.default_rng(8)
    p, g, mask = (r.standard_normal(n).astype(np.float32) for _ in range(3))
    mask = (mask > 0).astype(np.float32)
    m, v = r.standard_normal(n).astype(np.float32), r.random(n).astype(np.float32)
    hyper = np.array([1e-2, 1 - 0.9 ** 3, 1 - 0.95 ** 3, 1.0], np.float32)
    ref = [a.copy() for a in (p, m, v, hyper)]
    if max_norm:
        gradnorm.clip_factor(g, max_norm, ref[3][3:])
    adamw.update_from(ref[0], g, ref[1], ref[2], mask, ref[3], 0.9, 0.95, 1e-8, 0.1)
    dp, dm, dv, dh = (f32(cp, a) for a in (p, m, v, hyper))
    if max_norm:  # (the sum of squares' 1024 blocks are too slow to emulate: test_grad_norm on a GPU)
        sumsq = cp.asarray(np.array([float(g.astype(np.float64) @ g)]))
        gpu_gradnorm.factor_from_sumsq(sumsq, max_norm, dh[3:])
    gpu_adamw.update_from(dp, f32(cp, g), dm, dv, f32(cp, mask), dh, 0.9, 0.95, 1e-8, 0.1)
    assert abs(float(dh[3]) - float(ref[3][3])) <= 1e-6 * float(ref[3][3])
    close(dp, ref[0], 1e-5)
    close(dm, ref[1], 1e-5)
    close(dv, ref[2], 1e-5)
    args = (f32(cp, p), f32(cp, g), f32(cp, m), f32(cp, v), f32(cp, mask))
    gpu_adamw.update(*args, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, grad_scale=float(dh[3]))
    assert bool((args[0] == dp).all()) and bool((args[2] == dm).all())


def bf16_value(bits):
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("n", [1, 7, pytest.param(1_000_003, marks=large)])
def test_cast_to_bf16(cp, n):
    x = np.random.default_rng(8).standard_normal(n).astype(np.float32) * 100
    x[:min(n, 5)] = [1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, np.inf, -np.inf, 0.0][:min(n, 5)]  # ties go to even
    got = to_host(gpu_cast.to_bf16(cp.asarray(x)))
    assert got.dtype == np.uint16 and (got == kernel_emulator.bf16_bits(x)).all()
    assert np.isnan(bf16_value(to_host(gpu_cast.to_bf16(cp.asarray(np.float32([np.nan])))))).all()


@pytest.mark.parametrize("transa", [False, True])
@pytest.mark.parametrize("transb", [False, True])
def test_bf16_matmul(cp, transa, transb):
    """llmpi.gpu.bf16.matmul (cuBLAS GemmEx, float32 accumulate) against float64 on the same bf16 inputs;
    emulated, this checks our row-major to column-major mapping against a NumPy GemmEx."""
    from llmpi.gpu import bf16
    r = np.random.default_rng(9)
    M, K, N = 33, 70, 21
    a = r.standard_normal((K, M) if transa else (M, K)).astype(np.float32)
    b = r.standard_normal((N, K) if transb else (K, N)).astype(np.float32)
    ab, bb = gpu_cast.to_bf16(cp.asarray(a)), gpu_cast.to_bf16(cp.asarray(b))
    av, bv = bf16_value(to_host(ab)).astype(np.float64), bf16_value(to_host(bb)).astype(np.float64)
    ref = (av.T if transa else av) @ (bv.T if transb else bv)
    got = bf16.matmul(ab, bb, transa=transa, transb=transb)
    close(got, ref, 1e-5)
    acc = cp.ones((M, N), dtype=cp.float32)
    bf16.matmul(ab, bb, transa=transa, transb=transb, out=acc, accumulate=True)
    close(acc, ref + 1, 1e-5)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "bf16-matmul"])
def test_model_on_the_emulated_kernels(monkeypatch, precision):
    """The GPT's kernel path (the op tables of llmpi.gpu.ops, the padded LM head) on
    the CPU kernel emulator against the float64 layers: the dispatch and the caches between
    the kernels. bf16: bf16 activations end to end (BF16_OPS); bf16-matmul: float32 activations
    with bf16 matmuls (BF16_MATMUL_OPS, the tensor-parallel table)."""
    if UNDER_MPI or kernel_emulator.compiler() is None:
        pytest.skip("the kernel emulator runs in the single-process pass, with a C++20 compiler")
    from llmpi.config import ModelConfig
    from llmpi.gpu.ops import BF16_MATMUL_OPS, BF16_OPS, KERNEL_OPS
    from llmpi.model.gpt import GPT
    kernel_emulator.install(monkeypatch)
    monkeypatch.setenv("CUPY_TF32", "1" if precision == "tf32" else "0")
    cfg = dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)  # 2 blocks: every fused residual + LN
    ref = GPT(ModelConfig(dtype="float64", **cfg), seed=3)
    # NumPy arrays with the GPU model's op table: kernels on the emulator, LM head rows padded 13 -> 64
    tables = {"bf16": BF16_OPS, "bf16-matmul": BF16_MATMUL_OPS}
    dtype, ops = "bf16" if precision in tables else "float32", tables.get(precision, KERNEL_OPS)
    emulated = GPT(ModelConfig(dtype=dtype, **cfg), seed=3, ops=ops)
    emulated.params.data[...] = ref.params.data
    ref.params.data[...] = emulated.params.data  # both hold the same float32 values
    assert emulated.weights.head.shape == (64, 32)
    idx, tgt = np.random.default_rng(5).integers(0, 13, (2, 2, 16))
    _, loss_ref, cache = ref.forward(idx, tgt)
    ref.params.zero_grad()
    ref.backward(cache)
    _, loss, cache = emulated.forward(idx, tgt)
    # the attention's precision: CUDA cores, TF32 or bf16 tensor cores (on bf16 storage with BF16_OPS)
    assert cache["blocks"][0][2][-1] == {"bf16": "bf16io"}.get(precision, precision[:4])
    # the LayerNorms' inputs: the residual stream, bf16 between the kernels with BF16_OPS only
    assert cache["blocks"][0][4][0].dtype == (np.uint16 if precision == "bf16" else np.float32)
    assert emulated.activation_dtype == cache["blocks"][0][4][0].dtype
    emulated.params.zero_grad()
    emulated.backward(cache)
    loose = precision != "fp32"
    assert abs(loss - loss_ref) < (1e-2 if loose else 1e-5) * loss_ref
    assert abs(emulated.loss(idx, tgt) - loss) < 1e-6 * loss  # evaluation: the classifier without dlogits
    logits, _, _ = emulated.forward(idx)
    logits_ref, _, _ = ref.forward(idx)
    assert logits.dtype == np.float32 and rel_error(logits, logits_ref) < (2e-2 if loose else 1e-5)
    assert rel_error(emulated.params.grad, ref.params.grad) < (5e-2 if loose else 1e-4)
    if precision == "tf32":
        return  # what follows differs from fp32's only in the matmuls
    # model.recompute: backward rebuilds the GELU and LayerNorm outputs with the kernels, the same bits
    rebuilt = GPT(ModelConfig(dtype=dtype, recompute="gelu+ln", **cfg), seed=3, ops=ops)
    rebuilt.params.data[...] = emulated.params.data
    _, loss_rebuilt, cache = rebuilt.forward(idx, tgt)
    rebuilt.params.zero_grad()
    rebuilt.backward(cache)
    assert loss_rebuilt == loss and np.array_equal(rebuilt.params.grad, emulated.params.grad)


def test_crossentropy_on_padded_rows(cp):
    """The classifier on the first V columns of wider rows (the GPU LM head's padded logits):
    same losses and gradients, padding columns untouched."""
    r = np.random.default_rng(11)
    B, T, V, Vp = 2, 5, 37, 64
    full = r.standard_normal((B * T, Vp)) * 3
    targets = r.integers(0, V, (B, T))
    rloss, rcache = crossentropy.forward(full[:, :V].reshape(B, T, V).copy(), targets)
    rd = crossentropy.backward(rcache, 2.0)
    buf = f32(cp, full)
    logits = buf[:, :V].reshape(B, T, V)
    losses = gpu_classifier.losses(logits, cp.asarray(targets))
    assert abs(float(losses.mean()) - rloss) < 1e-5 * rloss
    loss, cache = gpu_classifier.forward(logits, cp.asarray(targets))
    assert abs(loss - rloss) < 1e-5 * rloss
    close(gpu_classifier.backward(cache, 2.0), rd, 1e-4)
    assert (to_host(buf)[:, V:] == full[:, V:].astype(np.float32)).all()


def test_bench_kernels_small_shape_passes_its_checks(cp):
    """`python -m llmpi.bench kernels --shape small` (the smoke run): every case's check passes
    on the kernels in use, including a head size without tensor-core entry points (48)."""
    from llmpi.bench import kernels as bench
    shape = dict(bench.SHAPES["small"])
    if cp is np:
        shape.update(B=1, P=5003)  # the emulator starts a host thread per CUDA thread
    names = []
    for name, check, _run, tol, _bytes, _flops in bench.cases(cp, **shape):
        if cp is np and name.startswith(("grad_sumsq", "crossentropy_fused")):
            continue  # 1024-block grid / V-wide rows: half a minute emulated, and tested above
        err = check()
        assert err <= tol, (name, err)
        names.append(name)
    assert "attention_forward" in names and "adamw_update" in names and "layernorm_forward_bf16" in names
    # head size 32 has tensor-core entry points: the attention on bf16 storage
    r = cp.random.default_rng(0)
    bf16io = [case for case in bench.attention_cases(cp, lambda *s: r.standard_normal(s, dtype=cp.float32),
                                                     1, 33, 2, 32) if case[0].endswith("_bf16io")]
    assert [case[0] for case in bf16io] == ["attention_forward_bf16io", "attention_backward_bf16io"]
    for name, check, _run, tol, _bytes, _flops in bf16io:
        err = check()
        assert err <= tol, (name, err)

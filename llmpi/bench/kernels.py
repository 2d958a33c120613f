"""`python -m llmpi.bench kernels [--json] [--repeats N] [--batch B] [--shape gpt2|small]`: every
CUDA kernel checked against its reference, then timed, at GPT-2 124M shapes (B=8, T=1024,
C=768, NH=12, V=50257, AdamW over 124M parameters); `--shape small` is a seconds-long smoke run.

The references are the NumPy layers of llmpi.model.layers run on CuPy arrays (the same code as on
the CPU; the embedding scatter-add runs on the host). Times are medians of CUDA-event
intervals around 10 calls queued behind a spin kernel (the kernels' GPU time, as in a
training step where the host runs ahead); the time of one call issued alone, launch gaps and
the wrapper's allocations included, is printed and kept as `ms_single_call`. Memory-bound
kernels report GB/s of the bytes they must move at least, as a fraction of the measured
device-to-device copy bandwidth; attention reports TFLOP/s as a
fraction of a measured float32 cuBLAS matmul (CUDA cores), its TF32 tensor-core version
(attention_tc.cu) as a fraction of the TF32 peak, taken as half a measured fp16 cuBLAS matmul,
and its bf16 tensor-core version as a fraction of that fp16 matmul (the bf16 rate).
The *_bf16 cases are the entry points of model.dtype = "bf16" (bf16 activations, 2 bytes an
element), checked against the float32 layers on the same bf16 values.
`ratio` is the geometric mean of the fractions.
"""
import math
import time

import numpy as np

from llmpi.cli import ArgumentParser

from ._common import emit_json

# rel. error allowed against the NumPy layer: float32, TF32 (10-bit mantissa inputs),
# bf16 (8-bit mantissa inputs and probabilities)
ATTENTION_TOLERANCE = {"fp32": 1e-4, "tf32": 3e-3, "bf16": 2e-2}
SHAPES = {
    "gpt2": dict(B=8, T=1024, C=768, NH=12, V=50257, P=124_475_904),
    "small": dict(B=2, T=65, C=96, NH=2, V=500, P=100_003),
}


# A one-thread kernel that keeps the GPU busy for a given number of nanoseconds (the global
# timer, so no clock rate is needed), so the host can queue the timed calls behind it: the
# events then time the GPU's work alone, not the Python between launches (which a training
# step hides by running ahead of the GPU).
SPIN_SOURCE = r"""
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"""


def _spin(xp, seconds):
    xp.RawKernel(SPIN_SOURCE, "spin")((1,), (1,), (np.uint64(seconds * 1e9),))


def gpu_time(xp, fn, repeats, warmup=2, calls=10):
    """(queued, single): median GPU seconds per fn().

    queued: `calls` calls queued behind a spin kernel and timed between two CUDA events, so
    the GPU runs them back to back (the kernel's own time; a call that synchronizes the host
    falls back to including its launch gaps). single: one call between two events right after
    the host issued them, launch gaps and allocations included."""
    for _ in range(warmup):
        fn()
    stream = xp.cuda.get_current_stream()
    stream.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_seconds = time.perf_counter() - t0
    stream.synchronize()
    queued, single = [], []
    for _ in range(repeats):
        start, end = xp.cuda.Event(), xp.cuda.Event()
        _spin(xp, 2 * host_seconds + 1e-3)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        queued.append(xp.cuda.get_elapsed_time(start, end) / 1e3 / calls)
        start.record()
        fn()
        end.record()
        end.synchronize()
        single.append(xp.cuda.get_elapsed_time(start, end) / 1e3)
    return float(np.median(queued)), float(np.median(single))


def copy_bandwidth(xp, repeats):
    """Bytes/s of a device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    src = xp.ones(1 << 28, dtype=xp.float32)
    dst = xp.empty_like(src)
    t, _ = gpu_time(xp, lambda: xp.copyto(dst, src), repeats, calls=3)
    return 2 * src.nbytes / t


def matmul_peak(xp, dtype, repeats, n=8192):
    """FLOP/s of an n x n x n cupy.matmul in `dtype`, or None when CuPy cannot do it."""
    try:
        a = xp.ones((n, n), dtype=dtype) * 0.01
        b = xp.ones((n, n), dtype=dtype) * 0.01
        t, _ = gpu_time(xp, lambda: xp.matmul(a, b), max(3, repeats // 4), calls=3)
    except (TypeError, ValueError):
        return None
    return 2.0 * n ** 3 / t


def rel_error(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def cases(xp, B, T, C, NH, V, P):
    """(name, check() -> error, run(), tolerance, bytes moved or None, flops or None)."""
    from llmpi.backend import to_host as host
    from llmpi.gpu import adamw as k_adamw, classifier as k_classifier, embedding as k_embedding, gelu as k_gelu
    from llmpi.gpu import gradnorm as k_gradnorm, layernorm as k_layernorm, residual as k_residual
    from llmpi.model.layers import adamw, crossentropy, embedding, gelu, layernorm, residual

    r = xp.random.default_rng(0)
    rand = lambda *shape: r.standard_normal(shape, dtype=xp.float32)  # noqa: E731
    N, HS, f4 = B * T, C // NH, 4
    out = []

    wte, wpe = rand(V, C) * 0.02, rand(T, C) * 0.02
    idx = xp.asarray(np.random.default_rng(1).integers(0, V, (B, T)))
    emb, emb_cache = k_embedding.forward(wte, wpe, idx)
    out.append(("embedding_forward", lambda: rel_error(host(emb), host(embedding.forward(wte, wpe, idx)[0])),
                lambda: k_embedding.forward(wte, wpe, idx), 1e-6, f4 * (2 * N * C + T * C) + 4 * N, None))
    demb, dwte, dwpe = rand(B, T, C), xp.zeros((V, C), xp.float32), xp.zeros((T, C), xp.float32)

    def check_emb_bwd():
        dwte[...] = 0
        dwpe[...] = 0
        k_embedding.backward(demb, emb_cache, dwte, dwpe)
        rw, rp = np.zeros((V, C)), np.zeros((T, C))
        embedding.backward(host(demb).astype(np.float64), host(idx), rw, rp)
        return max(rel_error(host(dwte), rw), rel_error(host(dwpe), rp))
    out.append(("embedding_backward", check_emb_bwd, lambda: k_embedding.backward(demb, emb_cache, dwte, dwpe),
                1e-5, f4 * 2 * N * C + 2 * f4 * T * C, None))

    x, w, b = rand(B, T, C), rand(C), rand(C)
    ln, ln_cache = k_layernorm.forward(x, w, b)
    out.append(("layernorm_forward", lambda: rel_error(host(ln), host(layernorm.forward(x, w, b)[0])),
                lambda: k_layernorm.forward(x, w, b), 1e-4, f4 * 2 * N * C, None))
    dln, dw, db = rand(B, T, C), xp.zeros(C, xp.float32), xp.zeros(C, xp.float32)

    def check_ln_bwd():
        dw[...] = 0
        db[...] = 0
        rdw, rdb = xp.zeros_like(dw), xp.zeros_like(db)
        got = k_layernorm.backward(dln, ln_cache, dw, db)
        ref = layernorm.backward(dln, layernorm.forward(x, w, b)[1], rdw, rdb)
        return max(rel_error(host(got), host(ref)), rel_error(host(dw), host(rdw)), rel_error(host(db), host(rdb)))
    out.append(("layernorm_backward", check_ln_bwd, lambda: k_layernorm.backward(dln, ln_cache, dw, db),
                1e-3, f4 * 3 * N * C, None))

    h, bias = rand(B, T, 4 * C), rand(4 * C)
    out.append(("gelu_forward", lambda: rel_error(host(k_gelu.forward(h)[0]), host(gelu.forward(h)[0])),
                lambda: k_gelu.forward(h), 1e-5, f4 * 2 * h.size, None))
    pre = h.copy()
    out.append(("bias_gelu_forward",
                lambda: rel_error(host(k_gelu.bias_forward(h.copy(), bias)[0]), host(gelu.forward(h + bias)[0])),
                lambda: k_gelu.bias_forward(pre, bias), 1e-5, f4 * 3 * h.size, None))
    dh = rand(B, T, 4 * C)
    out.append(("gelu_backward", lambda: rel_error(host(k_gelu.backward(dh, h)), host(gelu.backward(dh, h))),
                lambda: k_gelu.backward(dh, h), 1e-5, f4 * 3 * h.size, None))

    fx = rand(B, T, C)
    out.append(("residual_forward",
                lambda: rel_error(host(k_residual.forward(x, fx.copy())[0]), host(residual.forward(x, fx.copy())[0])),
                lambda: k_residual.forward(x, fx), 1e-6, f4 * 3 * N * C, None))

    out += attention_cases(xp, rand, B, T, NH, HS)

    logits, targets = rand(B, T, V), xp.asarray(np.random.default_rng(2).integers(0, V, (B, T)))

    def check_ce():
        lg = logits.copy()
        loss, cache = k_classifier.forward(lg, targets)
        ref_loss, ref_cache = crossentropy.forward(logits.copy(), targets)
        err = rel_error(host(k_classifier.backward(cache)), host(crossentropy.backward(ref_cache)))
        return max(err, abs(float(loss) - ref_loss) / ref_loss)
    work = logits.copy()
    out.append(("crossentropy_fused", check_ce, lambda: k_classifier.forward(work, targets), 1e-4,
                f4 * 2 * N * V, None))

    n = P
    p, g = rand(n) * 0.02, rand(n) * 1e-3
    mask = (r.random(n) < 0.9).astype(xp.float32)
    m, v = xp.zeros(n, xp.float32), xp.zeros(n, xp.float32)

    def check_adamw():  # the kernel's update against its NumPy/CuPy twin on the same arrays
        u = adamw.update(p, g, xp.zeros_like(m), xp.zeros_like(v), mask, 6e-4, 0.9, 0.95, 1e-8, 0.1, 1,
                         out=xp.empty_like(p))
        got = xp.empty_like(p)
        k_adamw.update(p, g, xp.zeros_like(m), xp.zeros_like(v), mask, 6e-4, 0.9, 0.95, 1e-8, 0.1, 1, out=got)
        return rel_error(host(got), host(u))
    out.append(("adamw_update", check_adamw,
                lambda: k_adamw.update(p, g, m, v, mask, 6e-4, 0.9, 0.95, 1e-8, 0.1, 1), 1e-4, f4 * 8 * n, None))
    out.append(("grad_sumsq", lambda: abs(float(k_gradnorm.sumsq(g)) / float((g.astype(xp.float64) ** 2).sum()) - 1),
                lambda: k_gradnorm.sumsq(g), 1e-9, f4 * n, None))
    return out + bf16_cases(xp, rand, B, T, C, V)


def attention_cases(xp, rand, B, T, NH, HS):
    """The attention's cases (as `cases`): CUDA cores (attention.cu), and TF32 and bf16 tensor cores
    (attention_tc.cu) where the head size has them, the bf16 ones also on bf16 storage."""
    from llmpi.backend import to_host as host
    from llmpi.gpu import attention as k_attention, attention_tc as k_attention_tc
    from llmpi.gpu.cast import from_bf16, to_bf16
    from llmpi.model.layers import attention

    out = []
    C = NH * HS
    qkv, dy = rand(B, T, 3 * C), rand(B, T, C)
    fwd_flops = 2.0 * B * NH * T * T * HS  # QK^T and PV, half of each under the causal mask
    for precision in k_attention.PRECISIONS if HS in k_attention_tc.HEAD_SIZES else ("fp32",):
        att, att_cache = k_attention.forward(qkv, NH, precision=precision)
        tol = ATTENTION_TOLERANCE[precision]
        suffix = "" if precision == "fp32" else "_" + precision
        out.append(("attention_forward" + suffix,
                    lambda att=att: rel_error(host(att), host(attention.forward(qkv, NH)[0])),
                    lambda p=precision: k_attention.forward(qkv, NH, precision=p), tol, None, fwd_flops))
        out.append(("attention_backward" + suffix,
                    lambda c=att_cache: rel_error(host(k_attention.backward(dy, c)),
                                                  host(attention.backward(dy, attention.forward(qkv, NH)[1]))),
                    lambda c=att_cache: k_attention.backward(dy, c), tol, None, 2.5 * fwd_flops))
    if HS in k_attention_tc.HEAD_SIZES:  # bf16 activations: the bf16 kernels reading and writing bf16 arrays
        qkv_b, dy_b = to_bf16(qkv), to_bf16(dy)
        att_b, cache_b = k_attention.forward_bf16_storage(qkv_b, NH)
        ref_att = attention.forward(from_bf16(qkv_b), NH)
        tol = ATTENTION_TOLERANCE["bf16"]
        out.append(("attention_forward_bf16io", lambda: rel_error(host(from_bf16(att_b)), host(ref_att[0])),
                    lambda: k_attention.forward_bf16_storage(qkv_b, NH), tol, None, fwd_flops))
        out.append(("attention_backward_bf16io",
                    lambda: rel_error(host(from_bf16(k_attention.backward_bf16_storage(dy_b, cache_b))),
                                      host(attention.backward(from_bf16(dy_b), ref_att[1]))),
                    lambda: k_attention.backward_bf16_storage(dy_b, cache_b), tol, None, 2.5 * fwd_flops))
    return out


def bf16_cases(xp, rand, B, T, C, V):
    """The bf16-activation entry points, as `cases`; references: the float32 layers on the bf16 values."""
    from llmpi.backend import to_host as host
    from llmpi.gpu import bias as k_bias, classifier as k_classifier, embedding as k_embedding, gelu as k_gelu
    from llmpi.gpu import layernorm as k_layernorm
    from llmpi.gpu.cast import from_bf16, to_bf16
    from llmpi.model.layers import crossentropy, embedding, gelu, layernorm

    N, f2, f4, tol = B * T, 2, 4, 1e-2  # one bf16 rounding of each output: 2^-9 relative
    err = lambda got, ref: rel_error(host(from_bf16(got) if got.dtype == np.uint16 else got), host(ref))  # noqa: E731
    out = []
    wte, wpe = rand(V, C) * 0.02, rand(T, C) * 0.02
    idx = xp.asarray(np.random.default_rng(1).integers(0, V, (B, T)))
    out.append(("embedding_forward_bf16",
                lambda: err(k_embedding.forward_bf16(wte, wpe, idx)[0], embedding.forward(wte, wpe, idx)[0]),
                lambda: k_embedding.forward_bf16(wte, wpe, idx), tol, f2 * N * C + f4 * (N * C + T * C) + 4 * N, None))
    x, fx, w, b = to_bf16(rand(B, T, C)), to_bf16(rand(B, T, C)), rand(C), rand(C)
    ln, ln_cache = k_layernorm.forward(x, w, b)
    out.append(("layernorm_forward_bf16", lambda: err(ln, layernorm.forward(from_bf16(x), w, b)[0]),
                lambda: k_layernorm.forward(x, w, b), tol, f2 * 2 * N * C, None))
    res = fx.copy()
    out.append(("residual_layernorm_bf16",
                lambda: err(k_layernorm.residual_forward(x, fx.copy(), w, b)[1],
                            layernorm.forward(from_bf16(x) + from_bf16(fx), w, b)[0]),
                lambda: k_layernorm.residual_forward(x, res, w, b), 2 * tol, f2 * 4 * N * C, None))
    dln, dw, db = to_bf16(rand(B, T, C)), xp.zeros(C, xp.float32), xp.zeros(C, xp.float32)
    out.append(("layernorm_backward_bf16",
                lambda: err(k_layernorm.backward(dln, ln_cache, dw, db),
                            layernorm.backward(from_bf16(dln), layernorm.forward(from_bf16(x), w, b)[1],
                                               xp.zeros_like(dw), xp.zeros_like(db))),
                lambda: k_layernorm.backward(dln, ln_cache, dw, db), tol, f2 * 3 * N * C, None))
    h, dh, bias = to_bf16(rand(B, T, 4 * C)), to_bf16(rand(B, T, 4 * C)), rand(4 * C)
    pre = h.copy()
    out.append(("bias_gelu_forward_bf16",
                lambda: err(k_gelu.bias_forward(h.copy(), bias)[0], gelu.forward(from_bf16(h) + bias)[0]),
                lambda: k_gelu.bias_forward(pre, bias), 2 * tol, f2 * 3 * h.size, None))
    out.append(("gelu_backward_bf16", lambda: err(k_gelu.backward(dh, h), gelu.backward(from_bf16(dh), from_bf16(h))),
                lambda: k_gelu.backward(dh, h), tol, f2 * 3 * h.size, None))
    d4 = dh.reshape(N, 4 * C)
    out.append(("bias_grad_bf16", lambda: err(_bias_grad(xp, k_bias, d4), from_bf16(d4).sum(axis=0)),
                lambda: k_bias.grad(d4, xp.zeros(4 * C, xp.float32)), 1e-4, f2 * d4.size, None))
    logits, targets = to_bf16(rand(B, T, V)), xp.asarray(np.random.default_rng(2).integers(0, V, (B, T)))

    def check_ce():
        loss, cache = k_classifier.forward(logits.copy(), targets)
        ref_loss, ref_cache = crossentropy.forward(from_bf16(logits), targets)
        return max(err(k_classifier.backward(cache), crossentropy.backward(ref_cache)),
                   abs(float(loss) - ref_loss) / ref_loss)
    work = logits.copy()
    out.append(("crossentropy_fused_bf16", check_ce, lambda: k_classifier.forward(work, targets), tol,
                f2 * 2 * N * V, None))
    return out


def _bias_grad(xp, k_bias, d2):
    db = xp.zeros(d2.shape[1], xp.float32)
    k_bias.grad(d2, db)
    return db


def main(argv):
    ap = ArgumentParser(prog="python -m llmpi.bench kernels")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per kernel (median)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2", help="kernel sizes")
    ap.add_argument("--batch", type=int, default=None, help="batch size B (default: the shape's)")
    args = ap.parse_args(argv)
    from llmpi import backend
    if not backend.gpu_available():
        print("no GPU")
        emit_json({"skipped": "no GPU"}, args.json)
        return 0
    xp = backend.select("gpu")
    shape = dict(SHAPES[args.shape])
    if args.batch:
        shape["B"] = args.batch
    copy_bw = copy_bandwidth(xp, args.repeats)
    mm32 = matmul_peak(xp, xp.float32, args.repeats)
    mm16 = matmul_peak(xp, xp.float16, args.repeats)
    tf32_peak = (mm16 or mm32) / 2  # TF32 tensor cores run at half the fp16 rate (A100, H100)
    print(f"{backend.device_name}  shape {shape}")
    print(f"copy {copy_bw / 1e9:.0f} GB/s, matmul fp32 {mm32 / 1e12:.1f} TFLOP/s, fp16 "
          f"{(mm16 or 0) / 1e12:.1f} TFLOP/s (bf16: CuPy has no bfloat16 dtype)")
    results, failed = {}, []
    for name, check, run, tol, nbytes, flops in cases(xp, **shape):
        err = check()
        ok = err <= tol
        if not ok:
            failed.append(name)
        t, t_single = gpu_time(xp, run, args.repeats)
        if flops is not None and name.endswith("_tf32"):
            frac = flops / t / tf32_peak
            line = f"{flops / t / 1e12:7.2f} TFLOP/s  {frac:6.1%} of TF32 peak"
        elif flops is not None and name.endswith(("_bf16", "_bf16io")):
            frac = flops / t / (mm16 or mm32)  # bf16 tensor cores run at the fp16 rate
            line = f"{flops / t / 1e12:7.2f} TFLOP/s  {frac:6.1%} of bf16 peak (fp16 matmul)"
        elif flops is not None:
            frac = flops / t / mm32
            line = f"{flops / t / 1e12:7.2f} TFLOP/s  {frac:6.1%} of fp32 matmul"
        else:
            frac = nbytes / t / copy_bw
            line = f"{nbytes / t / 1e9:7.0f} GB/s     {frac:6.1%} of copy"
        print(f"{name:20s} {'ok ' if ok else 'BAD'} err {err:.1e}  {t * 1e3:8.3f} ms  {line}  "
              f"(one call alone {t_single * 1e3:.3f} ms)", flush=True)
        results[name] = dict(ms=t * 1e3, ms_single_call=t_single * 1e3, fraction=frac, error=err, ok=ok)
        xp.get_default_memory_pool().free_all_blocks()
    ratio = math.exp(sum(math.log(r["fraction"]) for r in results.values()) / len(results))
    print(f"geometric mean fraction {ratio:.3f}" + (f"; WRONG: {', '.join(failed)}" if failed else ""))
    emit_json({"device": backend.device_name, "shape": shape, "copy_GBps": copy_bw / 1e9,
               "matmul_fp32_TFLOPs": mm32 / 1e12, "matmul_fp16_TFLOPs": mm16 and mm16 / 1e12,
               "kernels": results, "ratio": ratio, "all_ok": not failed}, args.json)
    return 1 if failed else 0

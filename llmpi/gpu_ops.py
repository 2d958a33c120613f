"""CUDA twins of llmpi/layers and llmpi/optim: same arguments, same results, one function per
kernel entry point (kernels/*.cu). The model can call these instead of the layer functions
when its arrays live on the GPU.

Every wrapper checks dtype (float32) and C-contiguity (the classifier: evenly strided rows),
because a RawKernel reads raw pointers and ignores views, and passes sizes as np.int32 and
scalars as np.float32: CuPy would otherwise send Python ints/floats as 64-bit values into
32-bit parameters.
Shape legend: B batch, T time, C channels, NH heads, HS head size, V vocab, N = B*T rows.
"""
import math
import os

import numpy as np

from . import cuda
from .backend import array_module, is_device_array

THREADS = 256
MAX_BLOCKS = 1 << 16  # grid-stride kernels cover any size with at most this many blocks
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y
ATT_WARPS = 8  # query/key rows per attention block, kernels/attention.cu
ATT_MAX_HS = 128
ATT_TC_ROWS = 64  # query/key rows per tensor-core attention block (4 warps), kernels/attention_tc.cu
ATT_TC_THREADS = 128
ATT_TC_HEAD_SIZES = (16, 32, 64)  # head sizes with tensor-core entry points
# attention precisions: float32 on CUDA cores (attention.cu), or tensor cores in TF32 or bf16
# (attention_tc.cu, entry points named attention_<pass>_<suffix><HS>)
ATT_PRECISIONS = ("fp32", "tf32", "bf16")
ATT_TC_SUFFIX = {"tf32": "tc", "bf16": "bf16_"}
LN_EPS = 1e-5  # llmpi.layers.layernorm.EPS
NORM_BLOCKS = 1024  # fixed, so the sum of squares has the same bits on every device
LN_ROWS = 32  # rows per partial sum of the LayerNorm parameter gradients
LN_VEC_MAX_C = 1024  # layernorm.cu's float4 register paths: C % 4 == 0 and C <= 128 * LN_MAXV
LN_FUSED_ROWS = 16  # rows per block (and per dw/db partial) of layernorm_backward_fused
LN_FUSED_THREADS = 128
LN_FINISH_THREADS = 1024  # 32 columns x 32 slices of the partials per block


def enabled_for(a) -> bool:
    """Whether the model and optimizer run the kernels on `a`: float32 device arrays only
    (float64 on the GPU, used by gradient checks, keeps the generic CuPy layers)."""
    return is_device_array(a) and a.dtype == np.float32


def _f32(*arrays):
    for a in arrays:
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"CUDA kernels need C-contiguous float32 arrays, got {a.dtype} "
                             f"{'contiguous' if a.flags.c_contiguous else 'strided'} {a.shape}")


# The kernels index with 32-bit ints, and a grid-stride loop steps i past n by up to one grid
# (MAX_BLOCKS * THREADS threads): sizes must leave that much headroom below 2^31, or i wraps
# negative and still passes `i < n`.
MAX_KERNEL_SIZE = 2 ** 31 - 1 - MAX_BLOCKS * THREADS


def _i32(n):
    if n > MAX_KERNEL_SIZE:
        raise ValueError(f"size {n} is beyond the kernels' 32-bit indexing (at most {MAX_KERNEL_SIZE}); "
                         "use a smaller model or batch per rank")
    return np.int32(n)


def _grid(n, threads=THREADS):
    return (max(1, min(MAX_BLOCKS, -(-n // threads))),)


def address(a) -> int:
    """Device (CuPy) or host (NumPy) address of a's first element, for alignment checks."""
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.ctypes.data


def _launch(file, name, grid, block, *args):
    cuda.kernel(file, name)(grid, block, args)


# ---- embedding ------------------------------------------------------------------------------

def embedding_forward(wte, wpe, idx):
    """wte (V, C), wpe (maxT, C), idx (B, T) int -> (out (B, T, C), idx32)."""
    xp = array_module(wte)
    _f32(wte, wpe)
    B, T = idx.shape
    C = wte.shape[1]
    idx32 = xp.ascontiguousarray(idx, dtype=xp.int32)
    out = xp.empty((B, T, C), dtype=xp.float32)
    _launch("embedding.cu", "embedding_forward", _grid(-(-B * T * C // 4)), (THREADS,),
            out, idx32, wte, wpe, _i32(B * T), _i32(T), _i32(C))
    return out, idx32


def embedding_backward(dout, cache, dwte, dwpe):
    """dout (B, T, C); adds into dwte (V, C) and dwpe (maxT, C), deterministically. Returns None."""
    xp = array_module(dout)
    _f32(dout, dwte, dwpe)
    idx32 = cache
    B, T, C = dout.shape
    BT = B * T
    # sort unique keys token*BT + position: equal tokens end up adjacent in position order
    keys = idx32.reshape(-1).astype(xp.int64) * BT + xp.arange(BT, dtype=xp.int64)
    keys = xp.sort(keys)
    _launch("embedding.cu", "embedding_backward_wte", (BT,), (THREADS,), dwte, dout, keys,
            _i32(BT), _i32(C))
    _launch("embedding.cu", "embedding_backward_wpe", _grid(T * C), (THREADS,), dwpe, dout,
            _i32(B), _i32(T), _i32(C))
    return None


# ---- layernorm ------------------------------------------------------------------------------

def layernorm_forward(x, w, b):
    """x (B, T, C), w (C,), b (C,) -> out (B, T, C); cache (x, w, mean, rstd), mean/rstd (B, T, 1)."""
    xp = array_module(x)
    _f32(x, w, b)
    C = x.shape[-1]
    N = x.size // C
    out = xp.empty_like(x)
    mean = xp.empty(x.shape[:-1] + (1,), dtype=xp.float32)
    rstd = xp.empty_like(mean)
    rows_per_block = THREADS // 32
    _launch("layernorm.cu", "layernorm_forward", (-(-N // rows_per_block),), (THREADS,),
            out, mean, rstd, x, w, b, _i32(N), _i32(C), np.float32(LN_EPS))
    return out, (x, w, mean, rstd)


def layernorm_backward(dout, cache, dw, db, dx=None):
    """dout (B, T, C) -> dx (B, T, C); adds into dw, db (C,). With `dx` given the input
    gradient is added into it (the residual stream) and it is returned."""
    xp = array_module(dout)
    x, w, mean, rstd = cache
    _f32(dout, x, w, mean, rstd, dw, db)
    C = x.shape[-1]
    N = x.size // C
    accumulate = dx is not None
    if accumulate:
        _f32(dx)
    else:
        dx = xp.empty_like(x)
    if C % 4 == 0 and C <= LN_VEC_MAX_C and all(address(a) % 16 == 0 for a in (dx, dout, x, w)):
        # float4 path: dx and the dw/db partials in one pass over dout and x
        P = -(-N // LN_FUSED_ROWS)
        partial = xp.empty((2, P, C), dtype=xp.float32)
        _launch("layernorm.cu", "layernorm_backward_fused", (P,), (LN_FUSED_THREADS,),
                dx, partial, dout, x, w, mean, rstd, _i32(N), _i32(C), np.int32(accumulate),
                _i32(LN_FUSED_ROWS))
    else:
        rows_per_block = THREADS // 32
        _launch("layernorm.cu", "layernorm_backward_dx", (-(-N // rows_per_block),), (THREADS,),
                dx, dout, x, w, mean, rstd, _i32(N), _i32(C), np.int32(accumulate))
        rows = max(LN_ROWS, -(-N // MAX_GRID_Y))  # P partials go on grid y
        P = -(-N // rows)
        partial = xp.empty((2, P, C), dtype=xp.float32)
        cblocks = -(-C // THREADS)
        _launch("layernorm.cu", "layernorm_backward_params_partial", (cblocks, P), (THREADS,),
                partial, dout, x, mean, rstd, _i32(N), _i32(C), _i32(rows))
    _launch("layernorm.cu", "layernorm_backward_params_finish", (-(-C // 32),), (LN_FINISH_THREADS,),
            dw, db, partial, _i32(P), _i32(C))
    return dx


# ---- gelu -----------------------------------------------------------------------------------

def gelu_forward(x):
    """x (B, T, 4C) -> (out (B, T, 4C), cache x)."""
    xp = array_module(x)
    _f32(x)
    out = xp.empty_like(x)
    _launch("gelu.cu", "gelu_forward", _grid(-(-x.size // 4)), (THREADS,), out, x, _i32(x.size))
    return out, x


def bias_gelu_forward(pre, bias):
    """pre (B, T, OC) += bias (OC) in place, then -> (gelu(pre), cache pre): c_fc's bias add
    fused into the activation, for a matmul output that has no bias yet."""
    xp = array_module(pre)
    _f32(pre, bias)
    out = xp.empty_like(pre)
    _launch("gelu.cu", "bias_gelu_forward", _grid(-(-pre.size // 4)), (THREADS,), out, pre, bias,
            _i32(pre.size), _i32(bias.size))
    return out, pre


def gelu_backward(dout, cache):
    """dout (B, T, 4C) -> dx (B, T, 4C)."""
    xp = array_module(dout)
    x = cache
    _f32(dout, x)
    dx = xp.empty_like(x)
    _launch("gelu.cu", "gelu_backward", _grid(-(-x.size // 4)), (THREADS,), dx, x, dout, _i32(x.size))
    return dx


# ---- bf16 cast ------------------------------------------------------------------------------

def to_bf16(x, out=None):
    """float32 x -> uint16 array of x's bfloat16 bit patterns (round to nearest even), same shape;
    CuPy has no bfloat16 dtype, and only cuBLAS reads these (llmpi.bf16)."""
    xp = array_module(x)
    _f32(x)
    if out is None:
        out = xp.empty(x.shape, dtype=xp.uint16)
    elif out.dtype != xp.uint16 or out.shape != x.shape or not out.flags.c_contiguous:
        raise ValueError(f"to_bf16 needs a C-contiguous uint16 {x.shape} output, got {out.dtype} {out.shape}")
    _launch("cast.cu", "cast_to_bf16", _grid(-(-x.size // 4)), (THREADS,), out, x, np.int64(x.size))
    return out


# ---- residual -------------------------------------------------------------------------------

def residual_forward(x, fx):
    """x, fx (B, T, C) -> (fx + x written into fx, None), as llmpi.layers.residual."""
    _f32(x, fx)
    _launch("residual.cu", "residual_forward", _grid(-(-x.size // 4)), (THREADS,), fx, fx, x,
            _i32(x.size))
    return fx, None


# ---- attention ------------------------------------------------------------------------------

def _att_dims(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // n_head
    if HS * n_head * 3 != C3 or HS > ATT_MAX_HS:
        raise ValueError(f"attention kernel needs 3*NH*HS columns with HS <= {ATT_MAX_HS}, "
                         f"got {C3} columns for {n_head} heads")
    if B * n_head > MAX_GRID_Y:  # one (batch, head) per grid row
        raise ValueError(f"attention kernels take at most {MAX_GRID_Y} batch x heads per call, got "
                         f"{B} x {n_head}; use a smaller micro-batch (train.micro_batch)")
    return B, T, C, HS


def tf32_allowed() -> bool:
    """CuPy's switch for TF32 tensor-core matmuls (CUPY_TF32=1); attention follows it."""
    try:  # CuPy's own reading of the variable: any positive integer switches TF32 on
        return int(os.environ.get("CUPY_TF32", "0")) > 0
    except ValueError:
        return False


def attention_tc_possible(qkv, n_head) -> bool:
    """Whether attention_tc.cu can run this qkv: a head size with entry points and 16-byte
    aligned rows (its float4 tile loads)."""
    return _tc_possible(_att_dims(qkv, n_head)[3], qkv)


def _tc_possible(HS, qkv):
    return HS in ATT_TC_HEAD_SIZES and address(qkv) % 16 == 0


def _attention_precision(HS, qkv, requested=None):
    """The precision attention runs in: `requested`, or with None TF32 tensor cores when TF32 is
    allowed and possible, else float32 on CUDA cores."""
    possible = _tc_possible(HS, qkv)
    if requested is None:
        return "tf32" if tf32_allowed() and possible else "fp32"
    if requested not in ATT_PRECISIONS:
        raise ValueError(f"attention precision must be one of {ATT_PRECISIONS}, got {requested!r}")
    if requested != "fp32" and not possible:
        raise ValueError(f"tensor-core attention needs head size in {ATT_TC_HEAD_SIZES} and 16-byte "
                         f"aligned qkv, got head size {HS}")
    return requested


def attention_forward(qkv, n_head, precision=None):
    """qkv (B, T, 3C) -> out (B, T, C); cache (qkv, out, lse (B, NH, T), n_head, precision).
    precision: "fp32" | "tf32" | "bf16", or None to follow tf32_allowed(); backward takes the
    forward's (its lse came from those scores)."""
    xp = array_module(qkv)
    _f32(qkv)
    B, T, C, HS = _att_dims(qkv, n_head)
    out = xp.empty((B, T, C), dtype=xp.float32)
    lse = xp.empty((B, n_head, T), dtype=xp.float32)
    scale = np.float32(1.0 / math.sqrt(HS))
    precision = _attention_precision(HS, qkv, precision)
    if precision != "fp32":
        _launch("attention_tc.cu", f"attention_forward_{ATT_TC_SUFFIX[precision]}{HS}",
                (-(-T // ATT_TC_ROWS), B * n_head), (ATT_TC_THREADS,), out, lse, qkv, _i32(T), _i32(n_head), scale)
    else:
        _launch("attention.cu", "attention_forward", (-(-T // ATT_WARPS), B * n_head),
                (ATT_WARPS * 32,), out, lse, qkv, _i32(T), _i32(n_head), _i32(HS), scale)
    return out, (qkv, out, lse, n_head, precision)


def attention_backward(dout, cache):
    """dout (B, T, C) -> dqkv (B, T, 3C)."""
    xp = array_module(dout)
    qkv, out, lse, NH, precision = cache
    _f32(dout, qkv, out, lse)
    B, T, C, HS = _att_dims(qkv, NH)
    delta = xp.empty((B, NH, T), dtype=xp.float32)
    rows = B * T * NH
    _launch("attention.cu", "attention_backward_delta", (-(-rows // (THREADS // 32)),),
            (THREADS,), delta, dout, out, _i32(B), _i32(T), _i32(NH), _i32(HS))
    dqkv = xp.empty_like(qkv)
    scale = np.float32(1.0 / math.sqrt(HS))
    if precision != "fp32":
        # the tensor-core kernels' row loads (float2/float4) need an aligned dout (a fresh copy is)
        if address(dout) % 16:
            dout = dout.copy()
        grid = (-(-T // ATT_TC_ROWS), B * NH)
        args = (dqkv, qkv, dout, lse, delta, _i32(T), _i32(NH), scale)
        suffix = ATT_TC_SUFFIX[precision]
        _launch("attention_tc.cu", f"attention_backward_dq_{suffix}{HS}", grid, (ATT_TC_THREADS,), *args)
        _launch("attention_tc.cu", f"attention_backward_dkv_{suffix}{HS}", grid, (ATT_TC_THREADS,), *args)
    else:
        grid = (-(-T // ATT_WARPS), B * NH)
        args = (dqkv, qkv, dout, lse, delta, _i32(T), _i32(NH), _i32(HS), scale)
        _launch("attention.cu", "attention_backward_dq", grid, (ATT_WARPS * 32,), *args)
        _launch("attention.cu", "attention_backward_dkv", grid, (ATT_WARPS * 32,), *args)
    return dqkv


# ---- classifier -----------------------------------------------------------------------------

def _row_stride(a):
    """Elements between consecutive rows (over all leading axes) of an array whose last axis is
    contiguous, such as the first V columns of a padded (N, Vp) buffer."""
    item = a.dtype.itemsize
    if a.ndim < 2 or a.strides[-1] != item:
        raise ValueError(f"the classifier needs rows with a contiguous last axis, got strides {a.strides}")
    # axes of length 1 take no step, and their strides mean nothing (NumPy and CuPy may give any)
    lead = [(n, st) for n, st in zip(a.shape[:-1], a.strides[:-1]) if n > 1]
    for (_, outer), (n, inner) in zip(lead, lead[1:]):
        if outer != inner * n:
            raise ValueError(f"the classifier needs evenly spaced rows, got strides {a.strides}")
    return (lead[-1][1] if lead else a.shape[-1] * item) // item


def _crossentropy(logits, targets, write_grad):
    """Per-token losses (N,) of the fused kernel; write_grad leaves dlogits (loss_scale 1) in
    the logits buffer. logits may be the first V columns of wider rows (a padded buffer)."""
    xp = array_module(logits)
    if logits.dtype != np.float32:
        raise ValueError(f"CUDA kernels need float32 arrays, got {logits.dtype} {logits.shape}")
    stride = _row_stride(logits)
    V = logits.shape[-1]
    N = logits.size // V
    t32 = xp.ascontiguousarray(targets.reshape(-1), dtype=xp.int32)
    losses = xp.empty(N, dtype=xp.float32)
    threads = min(1024, -(-V // 32) * 32)
    _launch("classifier.cu", "crossentropy_fused", (N,), (threads,), logits, losses, t32,
            _i32(N), _i32(V), np.int64(stride), np.float32(1.0 / N), np.int32(write_grad))
    return losses


def crossentropy_forward(logits, targets):
    """logits (B, T, V), targets (B, T) int -> (mean loss float, cache).

    One fused pass leaves dlogits for loss_scale = 1 in the logits buffer (as the NumPy layer
    leaves the probabilities there); the caller must not use the logits afterwards."""
    losses = _crossentropy(logits, targets, 1)
    return float(losses.sum(dtype=array_module(logits).float64)) / losses.size, logits


def crossentropy_losses(logits, targets):
    """Per-token losses (N,) without touching the logits (evaluation)."""
    return _crossentropy(logits, targets, 0)


def crossentropy_backward(cache, loss_scale=1.0):
    """-> dlogits (B, T, V) = loss_scale * (probs - onehot) / N, in place (cache consumed)."""
    dlogits = cache
    if loss_scale != 1.0:
        dlogits *= np.float32(loss_scale)
    return dlogits


# ---- optimizer ------------------------------------------------------------------------------

def adamw_update(p, g, m, v, mask, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0,
                 out=None):
    """One AdamW step t (1-based) over flat buffers; m, v updated in place.

    out=None: p is updated in place and returned. Otherwise out gets the update u
    (p_new = p + u, llmpi.optim.AdamW.delta) and p is left as it is."""
    _f32(p, g, m, v, mask)
    write_delta = out is not None
    if write_delta:
        _f32(out)
    else:
        out = p
    _launch("adamw.cu", "adamw_update", _grid(p.size), (THREADS,), out, p, g, m, v, mask,
            _i32(p.size), np.float32(lr), np.float32(beta1), np.float32(beta2), np.float32(eps),
            np.float32(weight_decay), np.float32(1.0 - beta1 ** t), np.float32(1.0 - beta2 ** t),
            np.float32(grad_scale), np.int32(write_delta))
    return out


def sumsq(x):
    """Sum of squares of a flat float32 buffer as a float64 device scalar (deterministic)."""
    xp = array_module(x)
    _f32(x)
    partial = xp.empty(NORM_BLOCKS, dtype=xp.float64)
    total = xp.empty(1, dtype=xp.float64)
    _launch("gradnorm.cu", "sumsq_partial", (NORM_BLOCKS,), (THREADS,), partial, x, _i32(x.size))
    _launch("gradnorm.cu", "sumsq_finish", (1,), (THREADS,), total, partial, _i32(NORM_BLOCKS))
    return total[0]


def clip_grad_norm(grad, max_norm):
    """As llmpi.optim.clip_grad_norm: scale grad in place to global norm <= max_norm (0 disables);
    returns the norm before clipping."""
    norm = math.sqrt(float(sumsq(grad)))
    if max_norm > 0 and norm > max_norm:
        grad *= np.float32(max_norm / (norm + 1e-6))
    return norm

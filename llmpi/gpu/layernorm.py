"""kernels/layernorm.cu: LayerNorm, the twin of llmpi.model.layers.layernorm, on float32 or bf16
(uint16) activations; statistics, weights and their gradients float32. `residual_forward`: the
residual add fused into the LayerNorm after it (bf16); `recompute`: a forward's output again."""
import numpy as np

from ..backend import address, array_module
from .common import MAX_GRID_Y, THREADS, check_f32, grid, i32, launch, storage

LN_EPS = 1e-5  # llmpi.model.layers.layernorm.EPS
LN_ROWS = 32  # rows per partial sum of the LayerNorm parameter gradients
LN_VEC_MAX_C = 1024  # layernorm.cu's float4 register paths: C % 4 == 0 and C <= 128 * LN_MAXV
LN_FUSED_ROWS = 16  # rows per block (and per dw/db partial) of layernorm_backward_fused
LN_FUSED_THREADS = 128
LN_FINISH_THREADS = 1024  # 32 columns x 32 slices of the partials per block


def forward(x, w, b):
    """x (B, T, C), w (C,), b (C,) -> out (B, T, C); cache (x, w, mean, rstd), mean/rstd (B, T, 1)."""
    suffix = storage(x)
    check_f32(w, b)
    out, mean, rstd, N, C = _outputs(x)
    launch("layernorm.cu", f"layernorm_forward{suffix}", (-(-N // (THREADS // 32)),), (THREADS,),
           out, mean, rstd, x, w, b, i32(N), i32(C), np.float32(LN_EPS))
    return out, (x, w, mean, rstd)


def residual_forward(x, fx, w, b):
    """x, fx (B, T, C) bf16 -> (fx + x written into fx, layernorm of it, the layernorm's cache):
    residual.forward then forward in one pass over the stream."""
    if storage(x, fx) != "_bf16":
        raise ValueError("the fused residual + LayerNorm kernel is for bf16 activations")
    check_f32(w, b)
    out, mean, rstd, N, C = _outputs(x)
    launch("layernorm.cu", "residual_layernorm_forward_bf16", (-(-N // (THREADS // 32)),), (THREADS,),
           fx, out, mean, rstd, x, fx, w, b, i32(N), i32(C), np.float32(LN_EPS))
    return fx, out, (fx, w, mean, rstd)


def recompute(cache, b):
    """forward's (or residual_forward's) output again from its cache and the bias b, the same bits
    (model.recompute = "gelu+ln")."""
    x, w, mean, rstd = cache
    suffix = storage(x)
    check_f32(w, b, mean, rstd)
    out = array_module(x).empty_like(x)
    C = x.shape[-1]
    launch("layernorm.cu", f"layernorm_recompute{suffix}", grid(x.size), (THREADS,), out, x, w, b, mean, rstd,
           i32(x.size // C), i32(C))
    return out


def _outputs(x):
    xp = array_module(x)
    C = x.shape[-1]
    mean = xp.empty(x.shape[:-1] + (1,), dtype=xp.float32)
    return xp.empty_like(x), mean, xp.empty_like(mean), x.size // C, C


def backward(dout, cache, dw, db, dx=None):
    """dout (B, T, C) -> dx (B, T, C); adds into dw, db (C,). With `dx` given the input
    gradient is added into it (the residual stream) and it is returned."""
    xp = array_module(dout)
    x, w, mean, rstd = cache
    check_f32(w, mean, rstd, dw, db)
    C = x.shape[-1]
    N = x.size // C
    accumulate = dx is not None
    if not accumulate:
        dx = xp.empty_like(x)
    suffix = storage(dout, x, dx)
    if not suffix and C % 4 == 0 and C <= LN_VEC_MAX_C and all(address(a) % 16 == 0 for a in (dx, dout, x, w)):
        # float4 path: dx and the dw/db partials in one pass over dout and x
        P = -(-N // LN_FUSED_ROWS)
        partial = xp.empty((2, P, C), dtype=xp.float32)
        launch("layernorm.cu", "layernorm_backward_fused", (P,), (LN_FUSED_THREADS,),
               dx, partial, dout, x, w, mean, rstd, i32(N), i32(C), np.int32(accumulate),
               i32(LN_FUSED_ROWS))
    else:
        rows_per_block = THREADS // 32
        launch("layernorm.cu", f"layernorm_backward_dx{suffix}", (-(-N // rows_per_block),), (THREADS,),
               dx, dout, x, w, mean, rstd, i32(N), i32(C), np.int32(accumulate))
        rows = max(LN_ROWS, -(-N // MAX_GRID_Y))  # P partials go on grid y
        P = -(-N // rows)
        partial = xp.empty((2, P, C), dtype=xp.float32)
        cblocks = -(-C // THREADS)
        launch("layernorm.cu", f"layernorm_backward_params_partial{suffix}", (cblocks, P), (THREADS,),
               partial, dout, x, mean, rstd, i32(N), i32(C), i32(rows))
    launch("layernorm.cu", "layernorm_backward_params_finish", (-(-C // 32),), (LN_FINISH_THREADS,),
           dw, db, partial, i32(P), i32(C))
    return dx

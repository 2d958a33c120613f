"""kernels/gelu.cu: GELU and the fused bias + GELU, twins of llmpi.model.layers.gelu; GELU, the
fused bias + GELU and the backward also on bf16 activations (their *_bf16 entry points)."""
from ..backend import array_module
from .common import THREADS, check_f32, grid, i32, launch, storage


def forward(x):
    """x (B, T, 4C) float32 or bf16 -> (out (B, T, 4C), cache x)."""
    xp = array_module(x)
    suffix = storage(x)
    out = xp.empty_like(x)
    launch("gelu.cu", f"gelu_forward{suffix}", grid(-(-x.size // 4)), (THREADS,), out, x, i32(x.size))
    return out, x


def recompute(cache):
    """bias_forward's output again from its cache, the same bits (model.recompute = "gelu")."""
    return forward(cache)[0]


def bias_forward(pre, bias):
    """pre (B, T, OC) += bias (OC) in place, then -> (gelu(pre), cache pre): c_fc's bias add
    fused into the activation, for a matmul output that has no bias yet."""
    xp = array_module(pre)
    suffix = storage(pre)
    check_f32(bias)
    out = xp.empty_like(pre)
    launch("gelu.cu", f"bias_gelu_forward{suffix}", grid(-(-pre.size // 4)), (THREADS,), out, pre, bias,
           i32(pre.size), i32(bias.size))
    return out, pre


def backward(dout, cache):
    """dout (B, T, 4C) -> dx (B, T, 4C)."""
    xp = array_module(dout)
    x = cache
    suffix = storage(dout, x)
    dx = xp.empty_like(x)
    launch("gelu.cu", f"gelu_backward{suffix}", grid(-(-x.size // 4)), (THREADS,), dx, x, dout, i32(x.size))
    return dx

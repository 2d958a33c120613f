"""kernels/cast.cu: float32 -> bf16 bit patterns (round to nearest even)."""
import numpy as np

from ..backend import array_module
from .common import THREADS, check_f32, grid, launch


def to_bf16(x, out=None):
    """float32 x -> uint16 array of x's bfloat16 bit patterns (round to nearest even), same shape;
    CuPy has no bfloat16 dtype, and only cuBLAS reads these (llmpi.gpu.bf16)."""
    xp = array_module(x)
    check_f32(x)
    if out is None:
        out = xp.empty(x.shape, dtype=xp.uint16)
    elif out.dtype != xp.uint16 or out.shape != x.shape or not out.flags.c_contiguous:
        raise ValueError(f"to_bf16 needs a C-contiguous uint16 {x.shape} output, got {out.dtype} {out.shape}")
    launch("cast.cu", "cast_to_bf16", grid(-(-x.size // 4)), (THREADS,), out, x, np.int64(x.size))
    return out

"""kernels/cast.cu: float32 <-> bf16 bit patterns (round to nearest even)."""
import numpy as np

from ..backend import array_module
from .common import BF16, THREADS, check_f32, grid, launch, storage


def to_bf16(x, out=None):
    """float32 x -> uint16 array of x's bfloat16 bit patterns (round to nearest even), same shape;
    CuPy has no bfloat16 dtype, and only cuBLAS reads these (llmpi.gpu.bf16)."""
    xp = array_module(x)
    check_f32(x)
    if out is None:
        out = xp.empty(x.shape, dtype=BF16)
    elif out.dtype != BF16 or out.shape != x.shape or not out.flags.c_contiguous:
        raise ValueError(f"to_bf16 needs a C-contiguous uint16 {x.shape} output, got {out.dtype} {out.shape}")
    launch("cast.cu", "cast_to_bf16", grid(-(-x.size // 4)), (THREADS,), out, x, np.int64(x.size))
    return out


def from_bf16(xb):
    """uint16 bf16 bit patterns -> float32 array of their values, same shape (exact)."""
    if storage(xb) != "_bf16":
        raise ValueError(f"from_bf16 needs a uint16 (bf16 bits) array, got {xb.dtype}")
    out = array_module(xb).empty(xb.shape, dtype=np.float32)
    launch("cast.cu", "cast_from_bf16", grid(xb.size), (THREADS,), out, xb, np.int64(xb.size))
    return out

"""What every kernel wrapper shares: launch sizes, argument checks, the launch itself.

Every wrapper checks dtype (float32) and C-contiguity, because a RawKernel reads raw pointers
and ignores views, and passes sizes as np.int32 and scalars as np.float32: CuPy would otherwise
send Python ints/floats as 64-bit values into 32-bit parameters.
Shape legend: B batch, T time, C channels, NH heads, HS head size, V vocab, N = B*T rows.
"""
import numpy as np

from . import loader

THREADS = 256
MAX_BLOCKS = 1 << 16  # grid-stride kernels cover any size with at most this many blocks
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y
# The kernels index with 32-bit ints, and a grid-stride loop steps i past n by up to one grid
# (MAX_BLOCKS * THREADS threads): sizes must leave that much headroom below 2^31, or i wraps
# negative and still passes `i < n`.
MAX_KERNEL_SIZE = 2 ** 31 - 1 - MAX_BLOCKS * THREADS


def check_f32(*arrays):
    for a in arrays:
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"CUDA kernels need C-contiguous float32 arrays, got {a.dtype} "
                             f"{'contiguous' if a.flags.c_contiguous else 'strided'} {a.shape}")


BF16 = np.uint16  # bf16 activations: arrays of bit patterns (CuPy has no bfloat16 dtype)


def storage(*arrays):
    """The entry-point suffix for activations stored as these arrays: "" for float32, "_bf16"
    for bf16 (uint16 bit patterns); all must be of that one dtype and C-contiguous."""
    dtype = arrays[0].dtype
    for a in arrays:
        if a.dtype != dtype or dtype not in (np.float32, BF16) or not a.flags.c_contiguous:
            got = ", ".join(f"{x.dtype} {'contiguous' if x.flags.c_contiguous else 'strided'} {x.shape}" for x in arrays)
            raise ValueError(f"CUDA kernels need C-contiguous float32 or bf16 (uint16) activations of one dtype, "
                             f"got {got}")
    return "_bf16" if dtype == BF16 else ""


def i32(n):
    if n > MAX_KERNEL_SIZE:
        raise ValueError(f"size {n} is beyond the kernels' 32-bit indexing (at most {MAX_KERNEL_SIZE}); "
                         "use a smaller model or batch per rank")
    return np.int32(n)


def grid(n, threads=THREADS):
    return (max(1, min(MAX_BLOCKS, -(-n // threads))),)


def launch(file, name, grid, block, *args):
    loader.kernel(file, name)(grid, block, args)

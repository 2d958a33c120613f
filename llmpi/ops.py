"""Which op table a model's arrays run on, decided once per model and optimizer.

NumPy arrays run the fused CPU kernels (llmpi.cpu.ops, Numba) or the NumPy layers
(llmpi.model.ops), as `select_cpu_kernels` chose for the process (train.cpu_kernels; until a
trainer or benchmark chooses, the layers: a library user's GPT stays the readable reference);
float64 on the GPU (gradient checks) runs the layers; float32 on the GPU runs the CUDA kernels,
bf16 their bf16 table (llmpi.gpu.ops), with bf16 activations, or for tensor-parallel shards
(whose all-reduces sum float32) the table with float32 activations and bf16 matmuls. The tables have the same entries, so nothing else asks
which device it is on.
"""
import numpy as np

from .errors import UserError
from .gpu.ops import BF16_MATMUL_OPS, BF16_OPS, KERNEL_OPS
from .model.ops import LAYER_OPS

CPU_KERNELS = ("auto", "numpy", "fused")  # train.cpu_kernels
_SELECTED = ["numpy"]


def _fused_table():
    try:
        from .cpu.ops import FUSED_OPS
    except ImportError:  # numba absent (an optional dependency)
        return None
    return FUSED_OPS


def select_cpu_kernels(choice, dtype="float32", comm=None, xp=np):
    """Choose the CPU table for this process: auto (fused when numba imports), numpy or fused.
    With the fused kernels, rank 0 of `comm` compiles them for `dtype` (or loads Numba's cache)
    before the other ranks, so ranks never write the cache at once (collective when comm is
    given); the first-run compile time, or the fallback, is printed once. A GPU run (`xp` not
    NumPy) compiles nothing. -> the choice made."""
    if choice not in CPU_KERNELS:
        raise UserError(f"train.cpu_kernels = {choice!r}; allowed: {', '.join(CPU_KERNELS)}")
    rank = comm.Get_rank() if comm is not None else 0
    table = None if choice == "numpy" or xp is not np else _fused_table()
    if table is None and choice == "fused" and xp is np:
        raise UserError("train.cpu_kernels = fused needs numba (pip install numba), or use auto or numpy")
    if table is None:
        if choice == "auto" and xp is np and rank == 0:
            print("cpu kernels: numba is not installed, the NumPy layers run (pip install numba for the fused ones)")
        _SELECTED[0] = "numpy"
        return "numpy"
    from .cpu.ops import warm
    np_dtype = np.float64 if dtype == "float64" else np.float32
    seconds = warm(np_dtype) if rank == 0 else 0.0
    if comm is not None:
        comm.Barrier()
        if rank != 0:
            warm(np_dtype)
    if seconds and rank == 0:
        print(f"cpu kernels: fused kernels compiled in {seconds:.1f} s (cached for the next runs)")
    _SELECTED[0] = "fused"
    return "fused"


def op_table(xp, dtype, sharded=False):
    """The table for arrays of module `xp` and the model dtype name or NumPy dtype `dtype`;
    sharded: tensor-parallel layers."""
    if xp is np:
        fused = _SELECTED[0] == "fused" and (dtype == "bf16" or np.dtype(dtype) in (np.float32, np.float64))
        return _fused_table() if fused else LAYER_OPS
    if dtype != "bf16" and np.dtype(dtype) == np.float64:
        return LAYER_OPS
    if dtype == "bf16":
        return BF16_MATMUL_OPS if sharded else BF16_OPS
    return KERNEL_OPS

"""Which op table a model's arrays run on, decided once per model and optimizer.

NumPy arrays, and float64 on the GPU (gradient checks), run the layers (llmpi.model.ops);
float32 on the GPU runs the CUDA kernels, bf16 their bf16 table (llmpi.gpu.ops). The tables
have the same entries, so nothing else asks which device it is on.
"""
import numpy as np

from .gpu.ops import BF16_OPS, KERNEL_OPS
from .model.ops import LAYER_OPS


def op_table(xp, dtype):
    """The table for arrays of module `xp` and the model dtype name or NumPy dtype `dtype`."""
    if xp is np or (dtype != "bf16" and np.dtype(dtype) == np.float64):
        return LAYER_OPS
    return BF16_OPS if dtype == "bf16" else KERNEL_OPS

"""bf16 tensor-core matmuls for model.dtype = "bf16" on the GPU.

The weights stay float32 (the master copy, the gradients and the optimizer state); every matmul
of the model (the 6N FLOPs per token) runs on bf16 inputs with float32 accumulation through
cuBLAS GemmEx, on bf16 copies of the weights made once per forward pass (kernels/cast.cu, round to
nearest even). Two sets of layers use them:
- bf16 activations (`act_*`, the default bf16 table): the activations are bf16 between kernels,
  so a GEMM reads its bf16 input as it is and writes bf16 (float32 accumulation, one rounding);
  the bias follows in kernels/bias.cu, and the weight gradients accumulate in float32.
- float32 activations (`linear_*`, `project`, `lm_head_*`: the table of tensor-parallel layers,
  whose all-reduces and vocab-parallel head work on float32): each activation is rounded to bf16
  where it enters a matmul and the GEMMs write float32.

CuPy has no bfloat16 dtype, so bf16 arrays are uint16 arrays of bit patterns that only cuBLAS
reads. cuBLAS is column-major: a row-major out = op(a) @ op(b) is computed as
out^T = op(b)^T @ op(a)^T, which needs no copies.
"""
import numpy as np

from ..backend import address, array_module
from ..model.layers.linear import column_sums
from ..model.layers.lm_head import full_rows
from . import bias, loader
from .cast import to_bf16
from .common import BF16

# cuBLAS and CUDA enum values (library_types.h, cublas_api.h)
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
_ONE = np.ones(1, np.float32)  # host scalars: CuPy's handle keeps cuBLAS's host pointer mode
_ZERO = np.zeros(1, np.float32)


def _check_bf16(a, name):
    if a.dtype != np.uint16 or a.ndim != 2 or not a.flags.c_contiguous:
        raise ValueError(f"bf16 matmul needs a C-contiguous 2-D uint16 (bf16 bits) {name}, "
                         f"got {a.dtype} {a.shape}")


def matmul(a, b, transa=False, transb=False, out=None, accumulate=False, out_dtype=np.float32):
    """op(a) @ op(b) as (M, N) of out_dtype (float32, or BF16: rounded once from the float32
    accumulator), or into `out`; a, b are bf16 (uint16) 2-D arrays, op transposes where asked.
    accumulate adds into `out` (cuBLAS beta = 1) instead of overwriting it."""
    _check_bf16(a, "a")
    _check_bf16(b, "b")
    M, K = a.shape[::-1] if transa else a.shape
    Kb, N = b.shape[::-1] if transb else b.shape
    if K != Kb:
        raise ValueError(f"bf16 matmul: inner sizes differ ({M}x{K} @ {Kb}x{N})")
    if out is None:
        if accumulate:
            raise ValueError("bf16 matmul: accumulate needs `out`")
        out = array_module(a).empty((M, N), dtype=out_dtype)
    if out.shape != (M, N) or out.dtype not in (np.float32, BF16) or not out.flags.c_contiguous:
        raise ValueError(f"bf16 matmul: out must be C-contiguous float32 or bf16 {(M, N)}, got {out.dtype} {out.shape}")
    loader.cublas_gemm_ex(CUBLAS_OP_T if transb else CUBLAS_OP_N, CUBLAS_OP_T if transa else CUBLAS_OP_N,
                        N, M, K, _ONE.ctypes.data,
                        address(b), CUDA_R_16BF, b.shape[1], address(a), CUDA_R_16BF, a.shape[1],
                        (_ONE if accumulate else _ZERO).ctypes.data, address(out),
                        CUDA_R_16BF if out.dtype == BF16 else CUDA_R_32F, N,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    return out


class Weights:
    """bf16 copies of a FlatParams' matrices, one flat uint16 buffer with named 2-D views, and
    `head`: wte with zero rows up to head_rows for the LM head (llmpi.model.layers.lm_head);
    refresh() re-rounds them from the float32 master weights."""

    def __init__(self, params, head_rows):
        self.params = params
        self.flat = params.xp.empty(params.size, dtype=np.uint16)
        self.views = {}
        for name, shape in params.layout:
            if len(shape) == 2:
                o, n = params.spans[name]
                self.views[name] = self.flat[o:o + n].reshape(shape)
        self.head = None  # a pipeline stage without the LM head
        if "wte" in self.views:
            V, C = params.shape("wte")
            self.head = params.xp.zeros((head_rows, C), dtype=np.uint16) if head_rows != V else self.views["wte"]

    def refresh(self):
        to_bf16(self.params.data, out=self.flat)
        if self.head is not None and self.head is not self.views["wte"]:
            to_bf16(self.params.views["wte"], out=self.head[:self.params.shape("wte")[0]])
        return self.views


def kept_input(x):
    """x (..., IN) float32 -> (rows, IN) bf16: what project and linear_forward keep of their input."""
    return to_bf16(x).reshape(-1, x.shape[-1])


def project(x, Wb):
    """x (..., IN) @ W (IN, OUT) without bias -> (out (..., OUT) float32, cache for linear_backward)."""
    xb = kept_input(x)
    return matmul(xb, Wb).reshape(*x.shape[:-1], Wb.shape[1]), (xb, Wb, x.shape)


def linear_forward(x, Wb, b):
    """As llmpi.model.layers.linear.forward with W in bf16: x (..., IN) -> x @ W + b (..., OUT)."""
    out, cache = project(x, Wb)
    out += b
    return out, cache


def linear_backward(dout, cache, dW, db):
    """As llmpi.model.layers.linear.backward: dout (..., OUT) -> dx (..., IN); adds into dW, db (float32)."""
    xb, Wb, xshape = cache
    d2 = dout.reshape(-1, dout.shape[-1])
    db += column_sums(d2)
    db2 = to_bf16(d2)
    matmul(xb, db2, transa=True, out=dW, accumulate=True)
    return matmul(db2, Wb, transb=True).reshape(xshape)


def lm_head_forward(xf2, head_b):
    """As llmpi.model.layers.lm_head.forward: xf2 (N, C) float32 @ head^T -> (N, rows of head) float32, cache."""
    xb = to_bf16(xf2)
    full = matmul(xb, head_b, transb=True)
    return full, (xb, head_b, full)


def lm_head_backward(d2, cache, dwte):
    """As llmpi.model.layers.lm_head.backward: d2 (N, V) dlogits -> dx (N, C); adds d2^T @ xf2 into dwte."""
    xb, head_b = cache[:2]
    d2b = to_bf16(full_rows(d2, cache))
    dwte += matmul(d2b, xb, transa=True)[:dwte.shape[0]]
    return matmul(d2b, head_b)


def act_kept_input(xb):
    """xb (..., IN) bf16 -> (rows, IN): what act_project and act_linear_forward keep of their input."""
    return xb.reshape(-1, xb.shape[-1])


def act_project(xb, Wb):
    """bf16 activations: xb (..., IN) @ W (IN, OUT) -> (out (..., OUT) bf16, cache), no bias."""
    x2 = act_kept_input(xb)
    return matmul(x2, Wb, out_dtype=BF16).reshape(*xb.shape[:-1], Wb.shape[1]), (x2, Wb, xb.shape)


def act_linear_forward(xb, Wb, b):
    """bf16 activations: xb (..., IN) -> xb @ W + b (..., OUT) bf16, cache."""
    out, cache = act_project(xb, Wb)
    bias.add(out.reshape(-1, out.shape[-1]), b)
    return out, cache


def act_linear_backward(doutb, cache, dW, db):
    """bf16 activations: doutb (..., OUT) -> dx (..., IN) bf16; adds into dW, db (float32)."""
    x2, Wb, xshape = cache
    d2 = doutb.reshape(-1, doutb.shape[-1])
    bias.grad(d2, db)
    matmul(x2, d2, transa=True, out=dW, accumulate=True)
    return matmul(d2, Wb, transb=True, out_dtype=BF16).reshape(xshape)


def act_lm_head_forward(xf2b, head_b):
    """bf16 activations: xf2b (N, C) @ head^T -> logits (N, rows of head) bf16, cache; the classifier
    reads them in bf16 and leaves bf16 dlogits in their place."""
    full = matmul(xf2b, head_b, transb=True, out_dtype=BF16)
    return full, (xf2b, head_b, full)


def act_lm_head_backward(d2, cache, dwte):
    """bf16 activations: d2 (N, V) dlogits in the forward's buffer -> dx (N, C) bf16; adds d2^T @ xf2 into dwte."""
    xb, head_b = cache[:2]
    d2b = full_rows(d2, cache)
    dwte += matmul(d2b, xb, transa=True)[:dwte.shape[0]]
    return matmul(d2b, head_b, out_dtype=BF16)

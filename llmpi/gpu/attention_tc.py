"""kernels/attention_tc.cu: causal attention on tensor cores (TF32 m16n8k8 or bf16 m16n8k16 mma,
float32 softmax and accumulators), launched by llmpi.gpu.attention when the precision asks for it.

Entry points are named attention_<pass>_<suffix><HS>, one per head size; the arrays are float32,
or with "bf16io" bf16 (uint16) but lse and delta, which stay float32.
"""
from ..backend import address
from .common import i32, launch

HEAD_SIZES = (16, 32, 64)  # head sizes with tensor-core entry points
ROWS = 64  # query/key rows per block (4 warps)
THREADS = 128
SUFFIX = {"tf32": "tc", "bf16": "bf16_", "bf16io": "bf16io_"}  # bf16io: bf16 storage (uint16 arrays), bf16 math


def possible(HS, qkv) -> bool:
    """A head size with entry points and 16-byte aligned rows (the float4 tile loads)."""
    return HS in HEAD_SIZES and address(qkv) % 16 == 0


def forward(out, lse, qkv, T, n_head, HS, scale, precision):
    """out (B, T, C), lse (B, NH, T) <- attention of qkv (B, T, 3C)."""
    B = qkv.shape[0]
    launch("attention_tc.cu", f"attention_forward_{SUFFIX[precision]}{HS}", (-(-T // ROWS), B * n_head),
           (THREADS,), out, lse, qkv, i32(T), i32(n_head), scale)


def backward(dqkv, qkv, dout, lse, delta, T, n_head, HS, scale, precision):
    """dqkv (B, T, 3C) <- the gradient, from the forward's lse and delta = rowsum(dout * out)."""
    # the kernels' row loads (float2/float4) need an aligned dout (a fresh copy is)
    if address(dout) % 16:
        dout = dout.copy()
    B = qkv.shape[0]
    grid = (-(-T // ROWS), B * n_head)
    args = (dqkv, qkv, dout, lse, delta, i32(T), i32(n_head), scale)
    suffix = SUFFIX[precision]
    launch("attention_tc.cu", f"attention_backward_dq_{suffix}{HS}", grid, (THREADS,), *args)
    launch("attention_tc.cu", f"attention_backward_dkv_{suffix}{HS}", grid, (THREADS,), *args)

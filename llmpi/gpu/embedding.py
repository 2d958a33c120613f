"""kernels/embedding.cu: token + position embedding, the twin of llmpi.model.layers.embedding,
writing float32 or bf16 activations (`forward_bf16`) from the float32 weights."""
import numpy as np

from ..backend import array_module
from .common import BF16, THREADS, check_f32, grid, i32, launch, storage


def forward(wte, wpe, idx, dtype=np.float32):
    """wte (V, C), wpe (maxT, C), idx (B, T) int -> (out (B, T, C) of `dtype`, idx32)."""
    xp = array_module(wte)
    check_f32(wte, wpe)
    B, T = idx.shape
    C = wte.shape[1]
    idx32 = xp.ascontiguousarray(idx, dtype=xp.int32)
    out = xp.empty((B, T, C), dtype=dtype)
    launch("embedding.cu", f"embedding_forward{storage(out)}", grid(-(-B * T * C // 4)), (THREADS,),
           out, idx32, wte, wpe, i32(B * T), i32(T), i32(C))
    return out, idx32


def forward_bf16(wte, wpe, idx):
    """forward with bf16 (uint16) activations out."""
    return forward(wte, wpe, idx, BF16)


def backward(dout, cache, dwte, dwpe):
    """dout (B, T, C); adds into dwte (V, C) and dwpe (maxT, C), deterministically. Returns None."""
    xp = array_module(dout)
    suffix = storage(dout)
    check_f32(dwte, dwpe)
    idx32 = cache
    B, T, C = dout.shape
    BT = B * T
    # sort unique keys token*BT + position: equal tokens end up adjacent in position order
    keys = idx32.reshape(-1).astype(xp.int64) * BT + xp.arange(BT, dtype=xp.int64)
    keys = xp.sort(keys)
    launch("embedding.cu", f"embedding_backward_wte{suffix}", (BT,), (THREADS,), dwte, dout, keys,
           i32(BT), i32(C))
    launch("embedding.cu", f"embedding_backward_wpe{suffix}", grid(T * C), (THREADS,), dwpe, dout,
           i32(B), i32(T), i32(C))
    return None

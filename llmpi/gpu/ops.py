"""The CUDA kernels' op tables, with the same entries as llmpi.model.ops.LAYER_OPS (see there).

KERNEL_OPS: float32 on the GPU; the matmuls are xp.matmul (cuBLAS; TF32 with CUPY_TF32=1), the
LM head reads wte padded to a multiple of 64 rows (llmpi.gpu.lm_head).
BF16_OPS: model.dtype = "bf16": the matmuls on bf16 copies of the weights and activations with
float32 results (llmpi.gpu.bf16), the attention on bf16 tensor cores where the head size allows,
float32 master weights and everything else.
"""
from types import SimpleNamespace

from ..model.layers import linear, lm_head
from . import adamw, attention, bf16, classifier, embedding, gelu, gradnorm, layernorm, residual
from .lm_head import PaddedHeadWeights, padded_vocab


def _describe_float32(dtype):
    if attention.tf32_allowed():
        return "float32 with TF32 tensor-core matmuls and attention (CUPY_TF32=1)"
    return "float32"


def _bf16_weights(params):
    return bf16.Weights(params, head_rows=padded_vocab(params.shape("wte")[0]) if "wte" in params.views else None)


KERNEL_OPS = SimpleNamespace(
    embedding=embedding, layernorm=layernorm, residual=residual, attention=attention,
    bias_gelu=SimpleNamespace(forward=gelu.bias_forward, backward=gelu.backward),
    crossentropy=SimpleNamespace(forward=classifier.forward, backward=classifier.backward, loss=classifier.loss),
    linear=linear, lm_head=lm_head, project=linear.project,
    adamw_update=adamw.update, clip_grad_norm=gradnorm.clip_grad_norm, sumsq=gradnorm.sumsq_float,
    weights=PaddedHeadWeights, precision=_describe_float32)

BF16_OPS = SimpleNamespace(**{
    **vars(KERNEL_OPS),
    "attention": SimpleNamespace(forward=attention.forward_bf16_where_possible, backward=attention.backward),
    "linear": SimpleNamespace(forward=bf16.linear_forward, backward=bf16.linear_backward),
    "lm_head": SimpleNamespace(forward=bf16.lm_head_forward, backward=bf16.lm_head_backward),
    "project": bf16.project, "weights": _bf16_weights,
    "precision": lambda dtype: "bf16 matmuls and attention products (float32 master weights and other ops)"})

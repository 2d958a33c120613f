"""The CUDA kernels' op tables, with the same entries as llmpi.model.ops.LAYER_OPS (see there).

KERNEL_OPS: float32 on the GPU; the matmuls are xp.matmul (cuBLAS; TF32 with CUPY_TF32=1), the
LM head reads wte padded to a multiple of 64 rows (llmpi.gpu.lm_head).
BF16_OPS: model.dtype = "bf16": bf16 activations between the kernels (uint16 bit patterns),
float32 master weights, gradients, optimizer state, statistics and accumulators; the matmuls on
bf16 copies of the weights (llmpi.gpu.bf16), the residual add fused into the LayerNorm after it,
the classifier on bf16 logits, the attention on bf16 tensor cores reading and writing bf16 where
the head size allows (widened to float32 for the other kernels, and rounded after, elsewhere).
BF16_MATMUL_OPS: bf16 for tensor-parallel layers (whose all-reduces and vocab-parallel head sum
float32 arrays): the matmuls and the attention on bf16 copies of float32 activations.
The wrappers of the element-wise kernels take float32 or bf16 arrays (llmpi.gpu.common.storage),
so both kinds of table share them.
"""
from types import SimpleNamespace

from ..model.layers import linear, lm_head
from ..model.ops import residual_then_layernorm, unchanged
from . import adamw, attention, bf16, classifier, embedding, gelu, gradnorm, layernorm, residual
from .cast import from_bf16
from .common import BF16
from .lm_head import PaddedHeadWeights, padded_vocab


def _describe_float32(dtype):
    if attention.tf32_allowed():
        return "float32 with TF32 tensor-core matmuls and attention (CUPY_TF32=1)"
    return "float32"


def _bf16_weights(params):
    return bf16.Weights(params, head_rows=padded_vocab(params.shape("wte")[0]) if "wte" in params.views else None)


KERNEL_OPS = SimpleNamespace(
    embedding=embedding, layernorm=layernorm, residual=residual, attention=attention,
    bias_gelu=SimpleNamespace(forward=gelu.bias_forward, backward=gelu.backward, recompute=gelu.recompute),
    crossentropy=SimpleNamespace(forward=classifier.forward, backward=classifier.backward, loss=classifier.loss),
    linear=linear, lm_head=lm_head, project=linear.project,
    adamw_update=adamw.update, clip_grad_norm=gradnorm.clip_grad_norm, sumsq=gradnorm.sumsq_float,
    adamw_update_from=adamw.update_from, clip_factor=gradnorm.clip_factor,
    linear_input=unchanged, weights=PaddedHeadWeights, precision=_describe_float32,
    residual_layernorm=residual_then_layernorm(residual, layernorm), activation_dtype=None, widen=unchanged)

BF16_MATMUL_OPS = SimpleNamespace(**{
    **vars(KERNEL_OPS),
    "attention": SimpleNamespace(forward=attention.forward_bf16_where_possible, backward=attention.backward),
    "linear": SimpleNamespace(forward=bf16.linear_forward, backward=bf16.linear_backward),
    "lm_head": SimpleNamespace(forward=bf16.lm_head_forward, backward=bf16.lm_head_backward),
    "project": bf16.project, "linear_input": bf16.kept_input, "weights": _bf16_weights,
    "precision": lambda dtype: "bf16 matmuls and attention products (float32 master weights, activations "
                               "and other ops: tensor-parallel layers)"})


def _widen(x):
    return from_bf16(x if x.flags.c_contiguous else x.copy())


BF16_OPS = SimpleNamespace(**{
    **vars(KERNEL_OPS),
    "embedding": SimpleNamespace(forward=embedding.forward_bf16, backward=embedding.backward),
    "attention": SimpleNamespace(forward=attention.forward_bf16_storage, backward=attention.backward_bf16_storage),
    "linear": SimpleNamespace(forward=bf16.act_linear_forward, backward=bf16.act_linear_backward),
    "lm_head": SimpleNamespace(forward=bf16.act_lm_head_forward, backward=bf16.act_lm_head_backward),
    "project": bf16.act_project, "linear_input": bf16.act_kept_input, "weights": _bf16_weights,
    "residual_layernorm": layernorm.residual_forward, "activation_dtype": BF16, "widen": _widen,
    "precision": lambda dtype: "bf16 activations and matmuls (float32 master weights, optimizer state, "
                               "statistics and accumulators)"})

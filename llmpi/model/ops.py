"""The op table of the NumPy/CuPy layers: every op the GPT and the optimizer call, by name.

llmpi.gpu.ops builds the CUDA kernels' tables with exactly these entries, so the model and the
optimizer take a table once (llmpi.ops.op_table) and never test for the device:
  embedding, layernorm, bias_gelu, residual, attention, crossentropy, linear, lm_head
      namespaces with forward/backward (layernorm.backward(..., dx=) adds into dx;
      crossentropy.loss is the evaluation loss, which keeps nothing for backward;
      bias_gelu.recompute(cache) is its forward's output again, bit for bit);
      a linear (and project) cache is a tuple whose first item is what it keeps of the input;
  linear_input(x)         that first item made from an input x (a recomputed input goes back in);
  residual_layernorm(x, fx, w, b) -> (x + fx written into fx, layernorm of it, its cache):
                          the residual add and the LayerNorm after it (one kernel where fused);
  project(x, W)           a linear layer's matmul whose bias a fused op adds (bias_gelu);
  adamw_update(...)       the optimizer's update over the flat buffers;
  adamw_update_from(..., hyper, ...)  the same with lr, both bias corrections and the gradient's
                          scale read from an array (a captured step: llmpi.training.graphed);
  clip_grad_norm(g, max)  global gradient-norm clipping (norm=: a norm summed over pipeline stages);
  clip_factor(g, max, out)  that clip's scale written into an array instead (no host round trip);
  sumsq(g)                a flat buffer's sum of squares (a stage's share of that norm);
  weights(params)         the matrices the matmuls read (refresh() each forward; .head);
  precision(dtype)        what the model computes in, for the startup line;
  activation_dtype        the dtype of the activations between the ops (None: the parameters');
  widen(x)                activations as floats for a caller outside the model (the logits).
"""
from types import SimpleNamespace

from .layers import adamw, attention, crossentropy, embedding, gelu, gradnorm, layernorm, linear, lm_head, residual


def residual_then_layernorm(residual, layernorm):
    """A table's residual_layernorm where no kernel fuses the two ops."""
    def residual_layernorm(x, fx, w, b):
        x, _ = residual.forward(x, fx)
        out, cache = layernorm.forward(x, w, b)
        return x, out, cache
    return residual_layernorm


def unchanged(x):
    """x itself: widen and linear_input for tables that keep activations as the parameters' floats."""
    return x


def describe_precision(dtype):
    if dtype == "bf16":
        return "float32 (bf16 is a GPU mode; the CPU computes it in float32)"
    return dtype


LAYER_OPS = SimpleNamespace(
    embedding=embedding, layernorm=layernorm, residual=residual, attention=attention,
    bias_gelu=SimpleNamespace(forward=gelu.bias_forward, backward=gelu.backward, recompute=gelu.recompute),
    crossentropy=crossentropy, linear=linear, lm_head=lm_head, project=linear.project,
    adamw_update=adamw.update, clip_grad_norm=gradnorm.clip_grad_norm, sumsq=gradnorm.sumsq,
    adamw_update_from=adamw.update_from, clip_factor=gradnorm.clip_factor,
    linear_input=unchanged, weights=linear.Weights, precision=describe_precision,
    residual_layernorm=residual_then_layernorm(residual, layernorm), activation_dtype=None, widen=unchanged)

"""Fused CPU kernels (Numba): each layer of llmpi.model.layers in one pass over memory, with no
temporaries of activation size. llmpi.cpu.ops puts them in FUSED_OPS, an op table with exactly
the entries of llmpi.model.ops.LAYER_OPS; the NumPy layers stay the readable reference and the
fallback when Numba is absent (llmpi.ops). Importing llmpi.cpu.ops needs numba; this package
itself does not.
"""

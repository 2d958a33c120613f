"""Everything CUDA: the kernel loader (loader), one wrapper module per kernels/*.cu file with the
same signatures as its NumPy twin in llmpi/model/layers, the bf16 matmuls (bf16), the LM head's
padding (lm_head), NCCL (nccl), and the op tables over them (ops). Besides llmpi/backend.py,
only this package imports cupy.
"""

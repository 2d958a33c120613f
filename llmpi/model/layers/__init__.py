"""Hand-written layers: each module has forward(...) -> (out, cache) and
backward(dout, cache, <grad views>) -> dx, adding (+=) into the gradient views; adamw and
gradnorm are the two flat-buffer ops of the optimizer. Each has a CUDA twin in llmpi/gpu/, and
llmpi.model.ops puts them all in one op table.

Shape legend: B batch, T time, C channels, NH heads, HS head size (C // NH), V vocab.
"""

"""Hand-written layers: each module has forward(...) -> (out, cache) and
backward(dout, cache, <grad views>) -> dx, adding (+=) into the gradient views.

Shape legend: B batch, T time, C channels, NH heads, HS head size (C // NH), V vocab.
"""

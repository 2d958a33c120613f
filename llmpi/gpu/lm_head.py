"""The LM head's row padding on the GPU: wte with zero rows appended up to padded_vocab(V).

GPT-2's 50257 would leave every logits row misaligned, which sends cuBLAS to slower kernels;
the classifier kernel reads and writes only the first V columns of the padded rows (see
llmpi.model.layers.lm_head).
"""
VOCAB_PAD = 64  # columns: 256-byte float32 rows, 128-byte bf16 rows


def padded_vocab(V):
    return -(-V // VOCAB_PAD) * VOCAB_PAD


class PaddedHeadWeights:
    """The matrices the float32 kernels' matmuls read: the parameters themselves, and as `head`
    wte copied into a zero-padded (padded_vocab(V), C) buffer at every refresh()."""

    def __init__(self, params):
        self.views = params.views
        if "wte" not in self.views:  # a pipeline stage without the head
            self.head = None
            return
        V, C = params.shape("wte")
        rows = padded_vocab(V)
        self.head = params.xp.zeros((rows, C), dtype=params.dtype) if rows != V else self.views["wte"]

    def refresh(self):
        if self.head is not None and self.head is not self.views["wte"]:
            self.head[:self.views["wte"].shape[0]] = self.views["wte"]
        return self.views

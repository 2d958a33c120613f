"""llmpi's GPT against an independent PyTorch GPT-2 (written here, autograd backward) in float64."""
import numpy as np
import pytest

from llmpi.config import ModelConfig
from llmpi.model.gpt import GPT

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_gpt2_loss(P, idx, targets, n_layer, n_head):
    """GPT-2 forward from a dict of HF-named tensors (Conv1D layout: y = x @ W + b)."""
    B, T = idx.shape
    C = P["wte"].shape[1]
    x = P["wte"][idx] + P["wpe"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(n_layer):
        h = lambda n: P[f"h.{i}.{n}"]
        a = F.layer_norm(x, (C,), h("ln_1.weight"), h("ln_1.bias"), eps=1e-5)
        q, k, v = (a @ h("attn.c_attn.weight") + h("attn.c_attn.bias")).split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (C // n_head) ** 0.5
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + (y @ h("attn.c_proj.weight") + h("attn.c_proj.bias"))
        m = F.layer_norm(x, (C,), h("ln_2.weight"), h("ln_2.bias"), eps=1e-5)
        m = F.gelu(m @ h("mlp.c_fc.weight") + h("mlp.c_fc.bias"), approximate="tanh")
        x = x + (m @ h("mlp.c_proj.weight") + h("mlp.c_proj.bias"))
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], eps=1e-5)
    logits = x @ P["wte"].T  # tied LM head
    return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))


@pytest.mark.parametrize("cfg,B,T", [
    (ModelConfig(vocab_size=37, block_size=16, n_layer=3, n_head=4, n_embd=32, dtype="float64"), 3, 16),
    (ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=3, n_embd=9, dtype="float64"), 2, 5),
])
def test_loss_and_every_gradient_match_pytorch(cfg, B, T):
    m = GPT(cfg, seed=3)
    p = m.params
    p.data += np.random.default_rng(1).normal(size=p.size) * 0.05  # break the init's zero biases/unit gains
    r = np.random.default_rng(2)
    x, y = r.integers(0, cfg.vocab_size, (B, T)), r.integers(0, cfg.vocab_size, (B, T))
    P = {n: torch.tensor(v.copy(), requires_grad=True) for n, v in m.state_dict().items()}
    ref = torch_gpt2_loss(P, torch.tensor(x), torch.tensor(y), cfg.n_layer, cfg.n_head)
    ref.backward()
    _, loss, cache = m.forward(x, y)
    m.backward(cache)
    assert abs(loss - ref.item()) / abs(ref.item()) < 1e-8
    for name in p.names:
        ours, theirs = p.grad_views[name], P[name].grad.numpy()
        err = np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30)
        assert err < 1e-8, (name, err)

"""CUDA graphs of the training step (train.cuda_graph, llmpi.gpu.graph) on a GPU: the captured
step replays the eager one, cuBLAS's GEMM inside a capture gives the eager GEMM's bits, and the
job trains. Without a GPU these skip; tests/test_train_mpi.py checks the same step on the CPU
with the captures run as plain calls, and test_train.py the refusals."""
import numpy as np
import pytest

from cli import single_process_only
from llmpi.backend import gpu_available
from llmpi.config import ModelConfig
from llmpi.errors import UserError
from llmpi.model.gpt import GPT
from llmpi.training import graphed
from llmpi.training.optim import AdamW
from test_gpu_train import corpus, train_on_gpu  # noqa: F401 (corpus is a fixture)

pytestmark = pytest.mark.skipif(not gpu_available(), reason="no GPU")


@pytest.fixture
def cp():
    import cupy
    return cupy


@pytest.fixture
def graphs(cp):
    """Graphs, or a skip naming why this CuPy cannot capture the step (llmpi.gpu.graph)."""
    from llmpi.gpu.graph import Graphs
    try:
        return Graphs()
    except UserError as err:
        pytest.skip(str(err))


def _steps(cp, capture, sizes, steps=4):
    """A bf16 GPT trained `steps` steps by GraphedStep with `capture`, one micro-batch per size."""
    cfg = ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=64, dtype="bf16")
    model = GPT(cfg, xp=cp, seed=5)
    opt = AdamW(model.params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, ops=model.ops)
    step = graphed.GraphedStep(model, opt, sum(sizes), 0.5, capture)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        model.params.zero_grad()
        for m in sizes:
            x, y = (cp.asarray(rng.integers(0, cfg.vocab_size, (m, cfg.block_size))) for _ in range(2))
            step.forward_backward(x, y)
        losses.append(step.loss_total())
        step.update(1e-3)
    return model, opt, losses


def test_captured_step_replays_the_eager_step(cp, graphs):
    """Steps 1 eager, 2 captured, 3 and 4 replayed, against four eager steps on the same batches:
    the same kernels on the same inputs, so equal to float32 rounding (expected bitwise)."""
    eager, eager_opt, eager_losses = _steps(cp, graphed.eager, (3, 2))
    model, opt, losses = _steps(cp, graphs, (3, 2))
    assert set(graphs.graphs) == {("forward_backward", 3), ("forward_backward", 2), ("update",)}
    scale = float(cp.abs(eager.params.data).max())
    assert float(cp.abs(model.params.data - eager.params.data).max()) <= 1e-6 * scale
    assert float(cp.abs(opt.v - eager_opt.v).max()) <= 1e-6 * float(cp.abs(eager_opt.v).max())
    assert np.allclose(losses, eager_losses, rtol=1e-6), (losses, eager_losses)
    assert losses[-1] < losses[0]


def test_bf16_gemm_inside_a_capture_gives_the_eager_bits(cp, graphs):
    """CuPy refuses cuBLAS calls during capture; llmpi.gpu.loader calls the library itself then."""
    from llmpi.gpu import bf16
    from llmpi.gpu.cast import to_bf16
    r = cp.random.default_rng(1)
    a, b = (to_bf16(r.standard_normal(shape, dtype=cp.float32)) for shape in ((48, 64), (64, 80)))
    expected = bf16.matmul(a, b)
    out = cp.zeros((48, 80), cp.float32)
    for _ in range(3):  # eager, captured, replayed
        out.fill(0)
        graphs("gemm", lambda: bf16.matmul(a, b, out=out, accumulate=True))
    assert "gemm" in graphs.graphs
    assert bool((out == expected).all())


@single_process_only
def test_cuda_graph_job_trains_like_the_eager_one(tmp_path, corpus, graphs):  # noqa: F811
    """`python -m llmpi.train --device gpu --set model.dtype=bf16 --set train.cuda_graph=true`,
    against the same job without graphs: the same losses to bf16 noise, and a clear drop."""
    for name in ("eager", "graph"):
        (tmp_path / name).mkdir()
    eager = train_on_gpu(tmp_path / "eager", corpus, 1, "--set", "model.dtype=bf16")
    captured = train_on_gpu(tmp_path / "graph", corpus, 1, "--set", "model.dtype=bf16",
                            "--set", "train.cuda_graph=true")
    assert len(captured) == len(eager) == 40
    assert np.allclose(captured[:5], eager[:5], rtol=1e-3), (captured[:5], eager[:5])
    assert captured[-10:].mean() < captured[:5].mean() - 0.25, captured

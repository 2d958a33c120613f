"""llmpi.bench._profile: every op of a training step is timed under its own key, on the CPU
layers and on the kernel path (CPU kernel emulator, CUDA events from a stand-in), and the
original functions come back afterwards."""
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

import kernel_emulator
from cli import run, single_process_only
from llmpi.bench import _profile
from llmpi.config import ModelConfig
from llmpi.gpu import gelu as gpu_gelu, layernorm as gpu_layernorm
from llmpi.gpu.ops import BF16_OPS, KERNEL_OPS
from llmpi.model.gpt import GPT
from llmpi.model.layers import layernorm, linear
from llmpi.model.ops import LAYER_OPS

UNDER_MPI = any(v in os.environ for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"))
L = 2
CFG = dict(vocab_size=13, block_size=16, n_layer=L, n_head=2, n_embd=32)
# calls per forward + backward of an L-layer GPT: each residual add but the last goes with the
# LayerNorm after it (residual_layernorm), the first ln_1 and ln_f stand alone
EXPECTED_CALLS = {
    "weights.refresh": 1, "embedding.forward": 1, "layernorm.forward": 2, "residual_layernorm": 2 * L - 1,
    "linear.forward": 3 * L, "project": L, "attention.forward": L, "bias_gelu.forward": L, "residual.forward": 1,
    "lm_head.forward": 1,
    "crossentropy.forward": 1, "crossentropy.backward": 1, "lm_head.backward": 1, "layernorm.backward": 2 * L + 1,
    "residual.backward": 2 * L, "linear.backward": 4 * L, "bias_gelu.backward": L, "attention.backward": L,
    "embedding.backward": 1,
}


class _StandInEvent:
    """cupy.cuda.Event on the host clock (the kernels ran synchronously on the emulator)."""

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


STAND_IN_CUPY = SimpleNamespace(cuda=SimpleNamespace(Event=_StandInEvent,
                                                     get_elapsed_time=lambda s, e: (e.t - s.t) * 1e3))


def _step(model, clock, steps=2):
    idx, tgt = np.random.default_rng(0).integers(0, 13, (2, 2, 16))
    for _ in range(steps):
        model.params.zero_grad()
        _, loss, cache = model.forward(idx, tgt)
        model.backward(cache)
    return loss


def test_every_op_of_the_cpu_model_is_timed_and_then_restored():
    originals = (layernorm.forward, linear.backward)
    m = GPT(ModelConfig(**CFG), seed=0)
    with _profile.timed_ops(m, _profile.HostClock()) as clock:
        _step(m, clock)
    assert dict(clock.calls) == {k: 2 * n for k, n in EXPECTED_CALLS.items()}
    assert all(t >= 0 for t in clock.seconds().values())
    assert (layernorm.forward, linear.backward) == originals
    ms = _profile.per_step_ms(clock, 2, step_seconds=1.0)
    assert list(ms.values()) == sorted(ms.values(), reverse=True)
    assert sum(ms.values()) == pytest.approx(1e3)  # "other" is the rest of the step


def test_a_failing_step_still_restores_the_ops():
    m = GPT(ModelConfig(**CFG), seed=0)
    original = LAYER_OPS.attention.forward
    with pytest.raises(ValueError):
        with _profile.timed_ops(m, _profile.HostClock()):
            m.forward(np.zeros((1, 17), np.int64))  # longer than block_size
    assert LAYER_OPS.attention.forward is original


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kernel_path_ops_are_timed_by_events(monkeypatch, precision):
    """The GPU model's op tables on NumPy (kernels on the CPU emulator): every entry the step
    calls is timed, the bf16 casts (weights.refresh) too, and everything is put back."""
    if UNDER_MPI or kernel_emulator.compiler() is None:
        pytest.skip("the kernel emulator runs in the single-process pass, with a C++20 compiler")
    kernel_emulator.install(monkeypatch)
    ops = BF16_OPS if precision == "bf16" else KERNEL_OPS
    m = GPT(ModelConfig(dtype="bf16" if precision == "bf16" else "float32", **CFG), seed=0, ops=ops)
    originals = (gpu_gelu.bias_forward, gpu_layernorm.backward, BF16_OPS.project, KERNEL_OPS.adamw_update)
    with _profile.timed_ops(m, _profile.EventClock(STAND_IN_CUPY)) as clock:
        loss = _step(m, clock, steps=1)
    assert dict(clock.calls) == EXPECTED_CALLS
    assert set(clock.seconds()) == set(EXPECTED_CALLS)
    assert (gpu_gelu.bias_forward, gpu_layernorm.backward, BF16_OPS.project, KERNEL_OPS.adamw_update) == originals
    assert "refresh" not in vars(m.weights)  # the class's method again
    assert np.isfinite(loss)


@single_process_only
def test_bench_train_reports_the_breakdown():
    proc = run(["-m", "llmpi.bench", "train", "--config", "tiny", "--steps", "3", "--repeats", "1", "--json"],
               check=True, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(EXPECTED_CALLS) | {"adamw", "clip", "zero_grad", "other (host, gaps)"} == set(result["llmpi_breakdown_ms"])


def test_gpu_bench_aggregates_ratios_and_the_batch_sweep(monkeypatch, capsys):
    """`bench train --device gpu` without a GPU: the variants' children stubbed with given speeds,
    the headline keys come out as the issue names them (ratio_bf16 at --batch, mfu_bf16 the best
    of the sweep with its batch, torch.compile beside them), and a torch.compile that fails is
    reported without failing the bench. ratio_bf16 is the step with CUDA graphs; when that run
    fails, the eager step's, and the bench fails."""
    from llmpi import backend
    from llmpi.bench import _train_gpu, train
    speeds = {("llmpi", "bf16_graph"): {8: 0.09, 16: 0.15, 32: 0.28}, ("torch", "bf16"): {8: 0.12, 16: 0.20, 32: 0.40},
              ("llmpi", "tf32"): {8: 0.12}, ("torch", "tf32"): {8: 0.15}, ("llmpi", "fp32"): {8: 0.5},
              ("llmpi", "bf16"): {8: 0.10, 16: 0.16, 32: 0.30}}
    broken = set()

    def child(which, precision, args, batch):
        if which == "torch_compile" or (which, precision) in broken:
            return {"error": "no compiler here"}
        return dict(step_s=speeds[(which, precision)][batch], peak_mem_mb=1.0, first_loss=4.0, last_loss=3.9)
    monkeypatch.setattr(_train_gpu, "_run", child)
    monkeypatch.setattr(_train_gpu, "_matmul_tf32", lambda: None)
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    monkeypatch.setattr(backend, "select", lambda device: None)
    assert train.main(["--device", "gpu", "--json", "--shape", "small"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ratio_bf16"] == pytest.approx(0.12 / 0.09) and result["ratio"] == result["ratio_bf16"]
    assert result["ratio_bf16_eager"] == pytest.approx(0.12 / 0.10) and result["bf16_graph"] is True
    assert result["ratio_tf32"] == pytest.approx(0.15 / 0.12)
    assert result["ratio_bf16_vs_compile"] is None and "error" in result["runs"]["torch_compile_bf16"]
    assert sorted(result["sweep"]) == ["16", "32"]
    assert result["sweep"]["32"]["ratio_bf16"] == pytest.approx(0.40 / 0.28)
    # tokens per step over step time: batch 32 at 0.28 s is the fastest per token
    assert result["best_batch_bf16"] == 32
    assert result["mfu_bf16"] == pytest.approx(result["sweep"]["32"]["llmpi"]["mfu"])

    broken.add(("llmpi", "bf16_graph"))
    assert train.main(["--device", "gpu", "--json", "--shape", "small"]) == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bf16_graph"] is False and result["ratio_bf16"] == pytest.approx(0.12 / 0.10)
    assert result["sweep"]["32"]["ratio_bf16"] == pytest.approx(0.40 / 0.30)  # the sweep fell back to eager

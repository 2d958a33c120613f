"""llmpi.compare on run directories with known metrics."""
import json
import os

import numpy as np
import pytest

from llmpi import compare
from llmpi.errors import UserError
from llmpi.training.metrics import MetricsLog


def make_run(root, name, mode, staleness):
    d = os.path.join(str(root), name)
    os.makedirs(d)
    log = MetricsLog(os.path.join(d, "metrics.h5"), True)
    for i in range(10):
        log.log_step(step=i + 1, wall=0.5 * (i + 1), loss=3.0 - 0.2 * i, lr=1e-3, tokens=64, samples=4 * (i + 1),
                     comm=0.1, staleness=staleness[i % len(staleness)])
    for i, v in enumerate([2.8, 2.2, 1.9]):
        log.log_eval(step=3 * (i + 1), wall=1.5 * (i + 1), samples=12 * (i + 1), val_loss=v)
    log.attrs.update(mode=mode, world_size=2)
    log.flush()
    return d


def test_table_and_json(tmp_path, capsys):
    a = make_run(tmp_path, "s", "sync", [-1])
    b = make_run(tmp_path, "a", "async", [0, 1, 1, 3])
    compare.main([a, b, "--target-loss", "2.0", "--json"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    sync, asyn = rows
    assert sync["final_val_loss"] == pytest.approx(1.9) and sync["updates"] == 10 and sync["samples"] == 40
    assert sync["time_to_target_s"] == pytest.approx(4.5) and sync["samples_to_target"] == 36
    assert sync["staleness_mean"] is None
    assert asyn["staleness_max"] == 3 and asyn["staleness_mean"] == pytest.approx(np.mean([0, 1, 1, 3, 0, 1, 1, 3, 0, 1]))
    assert sync["comm_share"] == pytest.approx(1.0 / 5.0) and asyn["comm_share"] == pytest.approx(0.1)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    a = make_run(tmp_path, "s", "sync", [-1])
    out = str(tmp_path / "fig.png")
    compare.main([a, "--plot", out])
    assert os.path.getsize(out) > 1000


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="has no metrics.h5"):
        compare.main([str(tmp_path)])


def make_study_run(root, name, ranks, val, comm_bytes, **parallel):
    """A run with the config.toml beside its metrics, as llmpi.train leaves it."""
    from llmpi import config
    d = os.path.join(str(root), name)
    os.makedirs(d)
    log = MetricsLog(os.path.join(d, "metrics.h5"), True)
    for i in range(10):
        log.log_step(step=i + 1, wall=float(i + 1), loss=3.0, lr=1e-3, tokens=64, samples=4 * (i + 1), comm=0.1,
                     staleness=-1, comm_bytes=comm_bytes)
    log.log_eval(step=10, wall=10.0 / ranks, samples=40, val_loss=val)
    log.attrs.update(mode=parallel.get("mode", "sync"), world_size=ranks)
    log.flush()
    job = config.load_job(None, ["model.vocab_size=65", *(f"parallel.{k}={v}" for k, v in parallel.items())])
    with open(os.path.join(d, "config.toml"), "w") as f:
        f.write(config.to_toml(job))
    return d


def test_methods_bytes_per_sample_and_the_default_target(tmp_path, capsys):
    from llmpi.model.gpt import parameter_bytes
    from llmpi import config
    sync = make_study_run(tmp_path, "sync", 4, 2.1, -1)
    local = make_study_run(tmp_path, "local", 4, 2.2, 800, mode="local", local_steps=8)
    dc = make_study_run(tmp_path, "dc", 2, 2.0, 16, mode="async", async_rule="dc", slowdown="1=2")
    ssp = make_study_run(tmp_path, "ssp", 2, 2.0, 16, mode="async", max_staleness=1)
    compare.main([sync, local, dc, ssp, "--json"])
    out = capsys.readouterr().out
    rows = {r["run"]: r for r in json.loads(out.strip().splitlines()[-1])["runs"]}
    assert [rows[n]["method"] for n in ("sync", "local", "dc", "ssp")] == \
        ["sync", "local H=8", "async dc slowed", "async plain SSP 1"]
    # sync counts no bytes: its all-reduce moves the gradient buffer out and in on each of 4 ranks a step
    n = parameter_bytes(config.load_job(None, ["model.vocab_size=65"]).model)
    assert rows["sync"]["comm_bytes_per_sample"] == pytest.approx(2 * n * 4 * 10 / 40)
    assert rows["local"]["comm_bytes_per_sample"] == pytest.approx(800 * 10 / 40)
    # by default the target is the highest final val loss, so every run has a time to it
    assert "target loss: 2.2000 (the highest of the runs' final losses" in out
    assert all(r["time_to_target_s"] is not None for r in rows.values())
    assert rows["local"]["time_to_target_s"] == pytest.approx(2.5)


def test_plot_against_ranks(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [make_study_run(tmp_path, f"{m}{p}", p, 2.0 + p / 100, 10, mode=m) for m in ("sync", "local")
            for p in (2, 4)]
    out, ranks = str(tmp_path / "fig.png"), str(tmp_path / "ranks.png")
    compare.main([*runs, "--plot", out, "--plot-ranks", ranks])
    assert os.path.getsize(out) > 1000 and os.path.getsize(ranks) > 1000

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

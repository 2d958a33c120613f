"""The training command end to end: multi-rank equivalence, resume, signals, failures.

Jobs run as a user runs them (`mpiexec -n N python -m llmpi.train ...`) in a temporary
directory, on a small byte-level corpus made from llmpi's own sources.
"""
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cli import REPO, clean_env, mpiexec, run, single_process_only
from llmpi import backend
from llmpi.training import metrics

pytestmark = single_process_only

TINY = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
        "--set", "model.block_size=16", "--set", "train.batch_size=8", "--set", "train.max_iters=12",
        "--set", "train.log_interval=4", "--set", "train.eval_interval=6", "--set", "train.eval_iters=2",
        "--set", "schedule.warmup_iters=3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A prepared byte-level file from llmpi's sources (~200 KB), shared by the module."""
    d = tmp_path_factory.mktemp("corpus")
    out = str(d / "tiny.h5")
    run(["-m", "llmpi.data", "prepare", "--input", os.path.join(REPO, "llmpi"), "--out", out], check=True)
    return out


def train(tmp_path, corpus, *extra, np=1, name="run", timeout=120, env=None, check=True):
    args = ["-m", "llmpi.train", *TINY, "--set", f"data.path={corpus}", "--run-name", name, *extra]
    return run(args, np=np, cwd=str(tmp_path), timeout=timeout, env=env, check=check)


def steps(tmp_path, name):
    return metrics.read(os.path.join(str(tmp_path), "runs", name, "metrics.h5"))["steps"]


@pytest.mark.parametrize("algorithm", ["mpi", "ring", "rd", "auto"], ids=["MPI_Allreduce", "ring", "rd", "auto"])
def test_n_ranks_match_one_process_on_the_same_samples(tmp_path, corpus, algorithm):
    train(tmp_path, corpus, name="one")
    train(tmp_path, corpus, "--set", f"parallel.allreduce={algorithm}", np=3, name="three")
    a, b = steps(tmp_path, "one")["loss"], steps(tmp_path, "three")["loss"]
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(a, b, rtol=2e-5)


def test_micro_batches_overlap_and_threads_match_plain_steps(tmp_path, corpus):
    train(tmp_path, corpus, np=2, name="plain")
    train(tmp_path, corpus, "--set", "train.micro_batch=1", "--set", "parallel.overlap=true",
          "--set", "parallel.bucket_mb=0.001", np=2, name="micro")
    train(tmp_path, corpus, "--set", "train.micro_batch=3", "--set", "train.threads=2", np=2, name="threads")
    np.testing.assert_allclose(steps(tmp_path, "plain")["loss"], steps(tmp_path, "micro")["loss"], rtol=2e-5)
    np.testing.assert_allclose(steps(tmp_path, "plain")["loss"], steps(tmp_path, "threads")["loss"], rtol=2e-5)


def test_resume_is_bitwise_identical(tmp_path, corpus):
    """A crashed run resumed from its checkpoint has the whole run's losses bitwise, also when the
    resumed part recomputes the GELU and LayerNorm outputs (model.recompute, which a checkpoint does
    not pin: it changes how backward gets its inputs, not one bit)."""
    train(tmp_path, corpus, "--set", "train.ckpt_interval=5", np=2, name="whole")
    crashed = train(tmp_path, corpus, "--set", "train.ckpt_interval=5", np=2, name="cut", check=False,
                    env=clean_env(LLMPI_FAULT="1:7"))
    assert crashed.returncode != 0
    assert os.path.exists(os.path.join(str(tmp_path), "runs", "cut", "ckpt_0000005.h5"))
    train(tmp_path, corpus, "--set", "train.ckpt_interval=5", "--set", "model.recompute=gelu+ln", "--resume",
          np=2, name="cut")
    whole, cut = steps(tmp_path, "whole"), steps(tmp_path, "cut")
    np.testing.assert_array_equal(whole["step"], cut["step"])
    assert whole["loss"].tobytes() == cut["loss"].tobytes()


def test_recompute_fits_a_memory_limit_that_kept_gelu_outputs_exceed(tmp_path, corpus):
    """parallel.memory_limit_mb between the two jobs' needs: the one that keeps the GELU outputs is
    refused, with model.recompute among the fixes; the one that recomputes them trains."""
    big = ["--set", "train.batch_size=256", "--set", "train.max_iters=2"]

    def needs(*extra):
        proc = train(tmp_path, corpus, *big, *extra, "--set", "parallel.memory_limit_mb=0.001", check=False)
        return float(re.search(r"needs ([0-9.]+) MiB", proc.stderr).group(1))

    kept, rebuilt = needs(), needs("--set", "model.recompute=gelu")
    assert rebuilt < kept - 1
    limit = ["--set", f"parallel.memory_limit_mb={(kept + rebuilt) / 2}"]
    refused = train(tmp_path, corpus, *big, *limit, check=False)
    assert refused.returncode == 2 and "model.recompute = 'gelu'" in refused.stderr, refused.stderr
    train(tmp_path, corpus, *big, *limit, "--set", "model.recompute=gelu", name="fits")
    assert len(steps(tmp_path, "fits")["loss"]) == 2


def test_crash_on_one_rank_ends_the_job_with_one_traceback(tmp_path, corpus):
    t0 = time.time()
    proc = train(tmp_path, corpus, np=4, name="crash", check=False, timeout=90,
                 env=clean_env(LLMPI_FAULT="2:3"))
    assert proc.returncode != 0
    assert time.time() - t0 < 60
    assert proc.stderr.count("[rank 2] uncaught exception") == 1
    assert "injected failure on rank 2 at step 3" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "Ctrl-C"])
def test_signal_checkpoints_and_exits_zero(tmp_path, corpus, sig):
    """SIGUSR1 (Slurm's warning) or a Ctrl-C to mpiexec: every rank stops at the same step and
    checkpoints (a Ctrl-C used to leave one rank exiting while the others waited in a collective)."""
    cmd = [mpiexec(), "-n", "2", sys.executable, "-u", "-m", "llmpi.train", *TINY, "--set", f"data.path={corpus}",
           "--set", "train.max_iters=100000", "--set", "train.log_interval=5", "--run-name", "sig"]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step"):
                break
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stop requested by signal" in out
    ckpts = glob.glob(os.path.join(str(tmp_path), "runs", "sig", "ckpt_*.h5"))
    assert len(ckpts) == 1


def test_a_rank_without_samples_takes_part(tmp_path, corpus):
    """batch 2 on 3 ranks: rank 2 has no samples. The overlapped bucketed all-reduce must post
    the same buckets there (it hung), and async mode must not divide by its zero share."""
    few = ["--set", "train.batch_size=2", "--set", "train.max_iters=3", "--set", "train.eval_iters=1"]
    train(tmp_path, corpus, *few, np=3, name="plain")
    train(tmp_path, corpus, *few, "--set", "parallel.overlap=true", "--set", "parallel.bucket_mb=0",
          np=3, name="overlap", timeout=60)
    np.testing.assert_allclose(steps(tmp_path, "plain")["loss"], steps(tmp_path, "overlap")["loss"], rtol=2e-5)
    proc = train(tmp_path, corpus, *few, "--set", "parallel.mode=async", np=3, name="async", timeout=60)
    assert "eval: version 9" in proc.stdout, proc.stdout


def test_resume_refuses_a_change_of_mode(tmp_path, corpus):
    train(tmp_path, corpus, name="s")
    proc = train(tmp_path, corpus, "--set", "parallel.mode=async", "--resume", name="s", np=2, check=False)
    assert proc.returncode == 2 and "written in sync mode" in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("model.recompute=all", "model.recompute = 'all' is not allowed; choose one of: none, gelu"),
    ("parallel.allreduce=tree", "parallel.allreduce = 'tree' is not allowed; choose one of: mpi, ring, rd, auto, nccl"),
    ("model.n_head=3", "must be divisible by model.n_head"),
    ("parallel.cuda_aware_mpi=maybe", "choose one of: auto, yes, no"),
    ("train.seed=-1", "train.seed must be >= 0"),
    ("optim.beta2=1.5", "optim.beta2 must be in [0, 1)"),
    ("schedule.min_lr=0.1", "schedule.min_lr must be between 0 and optim.lr"),
    ("parallel.balance=dynamic --set parallel.mode=async", "parallel.balance applies to sync mode"),
    ("train.cuda_graph=true", "train.cuda_graph = true needs train.device = 'gpu'"),
    ("train.cuda_graph=true --set train.device=auto", "train.cuda_graph = true needs model.dtype = 'bf16'"),
    # auto resolves to the CPU on a machine without a GPU: refused when the device is known
    *([("train.cuda_graph=true --set model.dtype=bf16 --set train.device=auto", "it needs train.device = 'gpu'")]
      if not backend.gpu_available() else []),
])
def test_bad_config_is_one_line_and_exit_2_on_every_rank(tmp_path, corpus, override, message):
    proc = train(tmp_path, corpus, *f"--set {override}".split(), np=3, check=False, timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmpi.train: error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize("module,args,message", [
    ("llmpi.train", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ("llmpi.bench", ["allreduce", "--repeats", "many"], "argument --repeats: invalid int value"),
    ("llmpi.bench", ["scaling", "--steps", "3"], "--steps must be at least 8"),
])
def test_bad_command_line_is_one_line_from_rank_0(tmp_path, module, args, message):
    proc = run(["-m", module, *args], np=3, cwd=str(tmp_path), timeout=60)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert message in lines[0]
    assert "--help" in lines[0] or not message.startswith("argument")  # argparse's own errors point to it


def test_data_tool_under_mpiexec_runs_on_rank_0_only(tmp_path):
    src = tmp_path / "text.txt"
    src.write_text("to be or not to be\n" * 200)
    out = str(tmp_path / "t.h5")
    proc = run(["-m", "llmpi.data", "prepare", "--input", str(src), "--out", out, "--quiet"], np=3, timeout=60)
    assert proc.returncode == 0 and proc.stdout.count("wrote ") == 1, proc.stdout + proc.stderr
    proc = run(["-m", "llmpi.data", "verify", str(tmp_path / "missing.h5")], np=3, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr
    proc = run(["-m", "llmpi.data", "decode", out, "--out", str(tmp_path / "nodir" / "x.txt")], np=3, timeout=60)
    assert proc.returncode == 2 and "its directory does not exist" in proc.stderr, proc.stderr


def test_compare_and_sample_report_once_under_mpiexec(tmp_path, corpus):
    train(tmp_path, corpus, name="r")
    run_dir = str(tmp_path / "runs" / "r")
    proc = run(["-m", "llmpi.compare", run_dir], np=3, timeout=60)
    assert proc.returncode == 0 and proc.stdout.count("val loss") == 1, proc.stdout
    proc = run(["-m", "llmpi.compare", run_dir, "--plot", str(tmp_path / "nodir" / "x.png")], np=3, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr
    proc = run(["-m", "llmpi.sample", run_dir, "--tokens", "5"], np=3, timeout=60)
    assert proc.returncode == 0 and proc.stderr.count("step 12") == 1, proc.stderr


def test_help_prints_once_under_mpiexec(tmp_path):
    proc = run(["-m", "llmpi.train", "--help"], np=3, cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 0 and proc.stdout.count("usage: python -m llmpi.train") == 1, proc.stdout
    # the allowed values come from their owners: every registered all-reduce, every mode
    assert "parallel.allreduce = 'mpi'\n      one of: mpi | ring | rd | auto | nccl" in proc.stdout
    assert "parallel.mode = 'sync'\n      one of: sync | async" in proc.stdout


def test_missing_data_file_and_refused_checkpoint(tmp_path, corpus):
    proc = train(tmp_path, "/nonexistent/x.h5", np=2, check=False)
    assert proc.returncode == 2 and "/nonexistent/x.h5" in proc.stderr and "Traceback" not in proc.stderr
    train(tmp_path, corpus, name="m")
    proc = train(tmp_path, corpus, "--set", "model.n_embd=48", "--resume", name="m", check=False)
    assert proc.returncode == 2 and "model.n_embd (checkpoint 32, job 48)" in proc.stderr
    proc = train(tmp_path, corpus, name="m", check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_corrupt_checkpoint_is_refused_cleanly(tmp_path, corpus):
    train(tmp_path, corpus, name="c")
    (path,) = glob.glob(os.path.join(str(tmp_path), "runs", "c", "ckpt_*.h5"))
    with open(path, "r+b") as f:
        f.truncate(100)
    proc = train(tmp_path, corpus, "--resume", name="c", np=2, check=False)
    assert proc.returncode == 2 and "not a readable HDF5 file" in proc.stderr and "Traceback" not in proc.stderr


def test_damaged_checkpoint_contents_and_log_are_handled(tmp_path, corpus):
    import h5py
    train(tmp_path, corpus, name="d")
    log = os.path.join(str(tmp_path), "runs", "d", "metrics.h5")
    with open(log, "w") as f:
        f.write("junk")
    more = ["--set", "train.max_iters=14", "--resume"]
    proc = train(tmp_path, corpus, *more, name="d", np=2)  # an unreadable log is set aside, not fatal
    assert "starting a new log" in proc.stdout and os.path.isfile(log + ".unreadable")
    assert steps(tmp_path, "d")["step"].tolist() == [13, 14]
    newest = sorted(glob.glob(os.path.join(str(tmp_path), "runs", "d", "ckpt_*.h5")))[-1]
    stage_file = os.path.join(os.path.dirname(newest), "stage0_" + os.path.basename(newest)[len("ckpt_"):])
    with h5py.File(stage_file, "r+") as f:
        del f["params/wte"]
        f["params/wte"] = np.ones(10, np.float32)
    proc = train(tmp_path, corpus, "--set", "train.max_iters=16", "--resume", name="d", np=2, check=False)
    assert proc.returncode == 2 and "holds wte of shape (10,)" in proc.stderr and "Traceback" not in proc.stderr
    os.remove(stage_file)  # a checkpoint that lost a part is skipped for the newest whole one
    proc = train(tmp_path, corpus, "--set", "train.max_iters=16", "--resume", name="d", np=2)
    assert "resume: skipped ckpt_0000014.h5" in proc.stdout and "is missing" in proc.stdout
    assert "resumed from runs/d/ckpt_0000012.h5 at step 12" in proc.stdout


def test_resume_refusals_name_the_fix(tmp_path, corpus):
    train(tmp_path, corpus, name="f")
    proc = train(tmp_path, corpus, "--resume", name="f", np=2, check=False)
    assert proc.returncode == 2 and "already at step 12" in proc.stderr
    train(tmp_path, corpus, "--set", "parallel.mode=async", name="a2", np=2)
    proc = train(tmp_path, corpus, "--set", "parallel.mode=async", "--set", "train.max_iters=20", "--resume",
                 name="a2", np=3, check=False)
    assert proc.returncode == 2 and "resume it with 2 ranks" in proc.stderr
    (tmp_path / "afile").write_text("")
    proc = train(tmp_path, corpus, "--set", "train.out_dir=afile", name="x", np=2, check=False)
    assert proc.returncode == 2 and "set train.out_dir to a writable directory" in proc.stderr
    assert proc.stderr.count("error:") == 1


@pytest.mark.parametrize("np_", [1, 2, 3, 4])
def test_async_terminates_at_every_world_size(tmp_path, corpus, np_):
    train(tmp_path, corpus, "--set", "parallel.mode=async", np=np_, name="a", timeout=90)
    logged = metrics.read(os.path.join(str(tmp_path), "runs", "a", "metrics.h5"))
    s, e = logged["steps"], logged["evals"]
    assert len(s["step"]) == 12 * np_  # exactly the update budget lands
    order = np.argsort(s["step"])
    np.testing.assert_array_equal(s["step"][order], np.arange(1, 12 * np_ + 1))
    # samples count each push's own share: 8 = 3 + 3 + 2 at 3 ranks, so not version * B / P
    pushed = np.diff(s["samples"][order], prepend=0)
    np.testing.assert_array_equal(pushed, s["tokens"][order] // 16)
    assert set(pushed.tolist()) <= {8 // np_, -(-8 // np_)}
    at_version = dict(zip(s["step"].tolist(), s["samples"].tolist()))
    assert [at_version[v] for v in e["step"].tolist()] == e["samples"].tolist()
    assert e["step"][-1] == 12 * np_


def test_async_with_one_rank_equals_sgd_step_for_step(tmp_path, corpus):
    sgd = ["--set", "optim.name=sgd", "--set", "optim.momentum=0", "--set", "optim.weight_decay=0",
           "--set", "optim.lr=0.5", "--set", "train.eval_interval=0"]
    train(tmp_path, corpus, *sgd, name="sync")
    train(tmp_path, corpus, *sgd, "--set", "parallel.mode=async", name="async")
    a, b = steps(tmp_path, "sync"), steps(tmp_path, "async")
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    assert (b["staleness"] == 0).all()


def test_async_checkpoint_on_signal_and_resume(tmp_path, corpus):
    """Rank 0 gets SIGUSR1 early: all workers stop, the checkpoint holds the version;
    --resume spends exactly the rest of the update budget."""
    args = ["--set", "parallel.mode=async", "--set", "schedule.decay_iters=12"]
    train(tmp_path, corpus, *args, np=2, name="ar", env=clean_env(LLMPI_FAULT="0:2:USR1"))
    first = steps(tmp_path, "ar")
    assert 2 <= len(first["step"]) < 24
    train(tmp_path, corpus, *args, "--resume", np=2, name="ar")
    s = steps(tmp_path, "ar")
    order = np.argsort(s["step"])
    np.testing.assert_array_equal(s["step"][order], np.arange(1, 25))
    np.testing.assert_array_equal(s["samples"][order], 4 * np.arange(1, 25))  # resumed from the saved count


def test_losses_are_also_printed_in_bits_per_byte(tmp_path, corpus):
    """A byte-level file has exactly one source byte per token: bits per byte = nats / ln 2."""
    proc = train(tmp_path, corpus, name="bpb")
    val, bpb = map(float, re.search(r"eval: step 12 \| val loss (\S+) \((\S+) bits/byte\)", proc.stdout).groups())
    assert abs(bpb - val / math.log(2)) < 2e-3
    assert re.search(r"\| loss \S+ \(\S+ bits/byte\) \| lr", proc.stdout)
    summary = run(["-m", "llmpi.compare", "runs/bpb", "--json"], cwd=str(tmp_path), check=True)
    (row,) = json.loads(summary.stdout.strip().splitlines()[-1])["runs"]
    assert abs(row["final_val_bits_per_byte"] - row["final_val_loss"] / math.log(2)) < 1e-9

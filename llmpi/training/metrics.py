"""Run logs: metrics.h5 in the run directory (rank 0 only) and the progress line.

metrics.h5 holds two groups of equal-length 1-D datasets:
  /steps: step, wall (seconds since start), loss, lr, tokens (global, this step),
          samples (global, cumulative), comm (seconds communicating, rank 0),
          staleness (async: staleness of this push; -1 in sync mode),
          bubble (pipeline: the measured idle share of the step, mean over ranks; -1 otherwise),
          comm_bytes (bytes of parameters, gradients or updates sent plus received in this row, all
          ranks together: an all-reduce of n bytes counts n out and n in per rank, an async push its
          pulls and the push; -1 where the loop does not count them)
  /evals: step, wall, samples, val_loss
The whole file is rewritten to a temporary name and renamed at each flush, so a
crash never leaves a half-written log.
"""
import math
import os
import time

import h5py
import numpy as np

STEP_FIELDS = ("step", "wall", "loss", "lr", "tokens", "samples", "comm", "staleness", "bubble", "comm_bytes")
EVAL_FIELDS = ("step", "wall", "samples", "val_loss")


class MetricsLog:
    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled
        self.steps = {k: [] for k in STEP_FIELDS}
        self.evals = {k: [] for k in EVAL_FIELDS}
        self.attrs = {}

    def resume_from(self, up_to_step: int):
        """Reload an earlier log, dropping rows after the checkpoint's step."""
        if not (self.enabled and os.path.isfile(self.path)):
            return 0.0
        try:
            data = read(self.path)
        except (OSError, KeyError) as err:  # only rank 0 logs: no error here, or the others would wait
            kept = f"{self.path}.unreadable"
            os.replace(self.path, kept)
            print(f"warning: {self.path} is unreadable ({err}); moved to {kept}, starting a new log", flush=True)
            return 0.0
        for group, store in (("steps", self.steps), ("evals", self.evals)):
            rows = data[group]
            keep = rows["step"] <= up_to_step if len(rows.get("step", [])) else []
            kept = int(np.count_nonzero(keep))
            for k in store:  # a field the older log lacks is -1 for its rows
                store[k] = list(np.asarray(rows[k])[keep]) if k in rows else [-1] * kept
        walls = self.steps["wall"]
        return float(walls[-1]) if walls else 0.0

    def log_step(self, **row):
        for k in STEP_FIELDS:
            self.steps[k].append(row.get(k, -1))

    def log_eval(self, **row):
        for k in EVAL_FIELDS:
            self.evals[k].append(row[k])

    def flush(self):
        if not self.enabled:
            return
        tmp = f"{self.path}.tmp.{os.getpid()}"
        try:
            with h5py.File(tmp, "w") as f:
                for group, store in (("steps", self.steps), ("evals", self.evals)):
                    g = f.create_group(group)
                    for k, v in store.items():
                        g.create_dataset(k, data=np.asarray(v, dtype=np.float64))
                for k, v in self.attrs.items():
                    f.attrs[k] = v
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def read(path: str) -> dict:
    """metrics.h5 as {"steps": {field: array}, "evals": {...}, "attrs": {...}}."""
    with h5py.File(path, "r") as f:
        return {
            "steps": {k: f["steps"][k][()] for k in f["steps"]},
            "evals": {k: f["evals"][k][()] for k in f["evals"]},
            "attrs": {k: f.attrs[k] for k in f.attrs},
        }


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def bits_per_byte(nats_per_token, bytes_per_token):
    """A loss in nats per token as bits per byte of the source text (tokenizers compare on it:
    byte, char and BPE files of one corpus), or None when the data file cannot say."""
    return nats_per_token / bytes_per_token / math.log(2) if bytes_per_token else None


def loss_text(name, nats, bytes_per_token):
    """"loss 2.4567" plus " (3.21 bits/byte)" where the data file gives its bytes per token."""
    bpb = bits_per_byte(nats, bytes_per_token)
    return f"{name} {nats:.4f}" + (f" ({bpb:.3f} bits/byte)" if bpb is not None else "")


class Progress:
    """Timing for the rank-0 progress line: tokens/s, ms/step, comm share, ETA (and the loss in
    bits per byte, given the data's bytes per token)."""

    def __init__(self, total_steps: int, start_step: int, bytes_per_token=None):
        self.total, self.start_step, self.bytes_per_token = total_steps, start_step, bytes_per_token
        self.t_start = time.perf_counter()
        self.window_t, self.window_tokens, self.window_steps, self.window_comm = self.t_start, 0, 0, 0.0

    def add(self, tokens: int, comm_s: float):
        self.window_tokens += tokens
        self.window_steps += 1
        self.window_comm += comm_s

    def line(self, step: int, loss: float, lr: float, extra: str = "") -> str:
        now = time.perf_counter()
        dt = max(now - self.window_t, 1e-9)
        ms = 1000 * dt / max(self.window_steps, 1)
        tok_s = self.window_tokens / dt
        comm = 100 * self.window_comm / dt
        done = step + 1 - self.start_step
        eta = (now - self.t_start) / max(done, 1) * (self.total - step - 1)
        self.window_t, self.window_tokens, self.window_steps, self.window_comm = now, 0, 0, 0.0
        text = (f"step {step + 1:>5}/{self.total} | {loss_text('loss', loss, self.bytes_per_token)} | lr {lr:.2e} | "
                f"{tok_s:,.0f} tok/s | "
                f"{ms:.1f} ms/step | comm {comm:.0f}% | eta {format_eta(eta)}")
        return text + (f" | {extra}" if extra else "")

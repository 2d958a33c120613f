"""HDF5 checkpoints, written atomically by rank 0, loaded without pickle.

Layout of runs/NAME/ckpt_STEP.h5:
  /params                flat parameter buffer (the model's one contiguous array)
  /optim/KEY             optimizer state arrays (sync mode: one copy, identical on all ranks)
  /optim_rank{r}/KEY     per-rank optimizer state (async mode: each worker keeps its own moments)
  /sampler_rank{r}/KEY   each rank's sampler state (cursors of the sharded strategies)
  /balancer/KEY          work-allocation state
  attrs: format_version, step, config (the resolved job as TOML), world_size, mode, and any
         extra scalars the trainer adds (e.g. the async version counter)
Files are written to a temporary name in the same directory and renamed, so a crash
never leaves a half-written checkpoint under the real name.
"""
import glob
import os
import re

import h5py
import numpy as np

from .. import config as config_mod
from ..errors import UserError

FORMAT_VERSION = 1
NAME_RE = re.compile(r"ckpt_(\d+)\.h5$")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_{step:07d}.h5")


def _write_group(f, name, d):
    g = f.create_group(name)
    for k, v in d.items():
        g.create_dataset(k, data=np.asarray(v))


def _durable_replace(tmp, path):
    """Rename tmp to path so that it survives a power loss or kernel crash too: the data reaches
    the disk before the rename, and the rename before the caller prunes older checkpoints."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save(path: str, params, step: int, job, optim_state=None, per_rank=None, balancer=None, attrs=None):
    """Write a checkpoint atomically. `per_rank` maps a group prefix ("sampler", "optim")
    to a list with one state dict per rank."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("params", data=np.asarray(params))
            if optim_state:
                _write_group(f, "optim", optim_state)
            for prefix, states in (per_rank or {}).items():
                for r, st in enumerate(states):
                    _write_group(f, f"{prefix}_rank{r}", st or {})
            if balancer:
                _write_group(f, "balancer", balancer)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["step"] = int(step)
            f.attrs["config"] = config_mod.to_toml(job)
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
        _durable_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def prune(run_dir: str, keep: int = 2):
    """Keep only the newest `keep` checkpoints so long runs do not fill the disk."""
    for old in list_checkpoints(run_dir)[:-keep]:
        os.remove(old)


def list_checkpoints(run_dir: str):
    found = [p for p in glob.glob(os.path.join(run_dir, "ckpt_*.h5")) if NAME_RE.search(p)]
    return sorted(found, key=lambda p: int(NAME_RE.search(p).group(1)))


def latest(run_dir: str):
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _read_group(f, name):
    return {k: f[name][k][()] for k in f[name]} if name in f else {}


def load(path: str) -> dict:
    """Read a checkpoint into plain arrays; any problem is one UserError line."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the run name or drop --resume")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"checkpoint {path} is not a readable HDF5 file (corrupt or truncated); "
                        "delete it to resume from an older one") from None
    with f:
        version = f.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"checkpoint {path} has format version {version}, this llmpi reads "
                            f"{FORMAT_VERSION}")
        if "params" not in f or "config" not in f.attrs:
            raise UserError(f"checkpoint {path} lacks params or config; it is not an llmpi checkpoint")
        try:
            out = {
                "params": f["params"][()],
                "step": int(f.attrs["step"]),
                "config": config_mod.from_toml_text(f.attrs["config"]),
                "optim": _read_group(f, "optim"),
                "balancer": _read_group(f, "balancer"),
                "attrs": {k: f.attrs[k] for k in f.attrs},
                "per_rank": {},
            }
            for name in f:
                m = re.match(r"(\w+)_rank(\d+)$", name)
                if m:
                    out["per_rank"].setdefault(m.group(1), {})[int(m.group(2))] = _read_group(f, name)
        except (OSError, KeyError, ValueError, TypeError) as err:  # TOMLDecodeError is a ValueError
            raise UserError(f"checkpoint {path} is damaged ({err}); delete it to resume from an older one") \
                from None
    return out


def load_latest(run_dir: str) -> dict:
    path = latest(run_dir)
    if path is None:
        raise UserError(f"no checkpoint (ckpt_*.h5) in {run_dir}; train first or check the path")
    return load(path)


def check_model_matches(ckpt_job, job, path: str):
    """Refuse a checkpoint whose model config differs from the job's, naming the keys."""
    a, b = config_mod.to_dict(ckpt_job)["model"], config_mod.to_dict(job)["model"]
    diff = [f"model.{k} (checkpoint {a[k]!r}, job {b[k]!r})" for k in a if a[k] != b[k]]
    if diff:
        raise UserError(f"checkpoint {path} was made with a different model config: {'; '.join(diff)}; "
                        "use the same model settings or start a new run name")

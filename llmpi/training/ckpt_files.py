"""Checkpoint files without the job config: their names, atomic writes with a checksum per
dataset, the checksum check, pruning. llmpi.training.checkpoint (the format, reading, the config)
re-exports them; the async loop uses them directly, as it may not import the config (which imports
the loop for its constants).
"""
import contextlib
import glob
import hashlib
import os
import re

import h5py
import numpy as np

from ..errors import UserError

FORMAT_VERSION = 2
NAME_RE = re.compile(r"ckpt_(\d+)\.h5$")
PART_RE = re.compile(r"(stage|rank)[\w.]*_(\d+)\.h5$")  # a checkpoint's stage (and shard) or rank file


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_{step:07d}.h5")


def stage_path(path: str, stage: int, shard=None) -> str:
    """The file of `stage` (of its tensor `shard`) beside the manifest `path`
    (runs/NAME/ckpt_STEP.h5 -> stageS_STEP.h5, or stageS.tK_STEP.h5)."""
    folder, name = os.path.split(path)
    part = f"stage{stage}" if shard is None else f"stage{stage}.t{shard}"
    return os.path.join(folder, f"{part}_{NAME_RE.search(name).group(1)}.h5")


def rank_path(path: str, rank: int) -> str:
    """The part of `rank` beside the manifest `path` (runs/NAME/ckpt_STEP.h5 -> rankR_STEP.h5)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"rank{rank}_{NAME_RE.search(name).group(1)}.h5")


def _digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _write_group(f, name, d, full_shapes=None):
    """One dataset per entry, each with the sha256 of its bytes (checked whenever it is read) and,
    for a tensor shard, the shape of the whole parameter."""
    g = f.create_group(name)
    for k, v in d.items():
        ds = g.create_dataset(k, data=np.asarray(v))
        ds.attrs["sha256"] = _digest(ds[()])
        if full_shapes and k in full_shapes:
            ds.attrs["full_shape"] = np.asarray(full_shapes[k], dtype=np.int64)


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


def _atomic_h5(path, fill):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            fill(f)
        _durable_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_stage(path, params, optim=None, optim_step=0, tensor=None):
    """One stage's file: params {name: host array}; optim {key: {name: host array}}; tensor:
    None, or (k, K, {name: whole shape}) for the file of tensor shard k, naming its shards."""
    shapes = tensor[2] if tensor else None

    def fill(f):
        _write_group(f, "params", params, shapes)
        for key, named in (optim or {}).items():
            _write_group(f, f"optim/{key}", named, shapes)
        f.attrs["optim_step"] = int(optim_step)
        if tensor:
            f.attrs["tensor_rank"], f.attrs["tensor_size"] = int(tensor[0]), int(tensor[1])
    return _atomic_h5(path, fill)


def save_rank_part(path, rank, groups, attrs=None):
    """One rank's own part of a checkpoint: {prefix: state} as /PREFIX_rank{rank}/KEY, as a
    manifest would hold them, and scalar attrs (what its manifest's writer sums up)."""
    def fill(f):
        for prefix, state in groups.items():
            _write_group(f, f"{prefix}_rank{rank}", state or {})
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return _atomic_h5(path, fill)


def claim(path):
    """The claim file (remove it when done) for exactly one of the ranks that ask to write the
    manifest `path`, None for the others: an exclusive create; its .tmp name is cleaned at the next
    start if its holder is killed."""
    try:
        os.close(os.open(path + ".claim.tmp", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return path + ".claim.tmp"
    except FileExistsError:
        return None


def save_manifest_text(path, step, config_toml, stages, per_rank=None, balancer=None, attrs=None):
    """The manifest, once every stage file in `stages` (their paths) is in place; config_toml: the
    resolved job (llmpi.training.checkpoint.save_manifest makes it from a Job)."""
    def fill(f):
        for prefix, states in (per_rank or {}).items():
            for r, st in enumerate(states):
                _write_group(f, f"{prefix}_rank{r}", st or {})
        if balancer:
            _write_group(f, "balancer", balancer)
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["step"] = int(step)
        f.attrs["config"] = config_toml
        f.attrs["stage_files"] = [os.path.basename(p) for p in stages]
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return _atomic_h5(path, fill)


def prune(run_dir: str, keep: int = 2, protect=None):
    """Keep only the newest `keep` checkpoints so long runs do not fill the disk, and `protect`
    (the newest one known to verify) whatever its age; the manifest goes first, so a half-pruned
    checkpoint is never taken for a whole one."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if protect is None or os.path.abspath(old) != os.path.abspath(protect):
            remove(old)


def remove(path):
    """A checkpoint: its manifest, then its stage and rank files."""
    _remove_quietly(path)
    step = NAME_RE.search(os.path.basename(path)).group(1)
    for part in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), f"*_{step}.h5")):
        if PART_RE.match(os.path.basename(part)):
            _remove_quietly(part)


def _remove_quietly(path):
    with contextlib.suppress(FileNotFoundError):  # an earlier prune, or another rank's, was first
        os.remove(path)


def remove_incomplete(run_dir):
    """Remove stage and rank files without a manifest (an async worker left the loop first); call it
    only while no one writes checkpoints."""
    steps = {NAME_RE.search(p).group(1) for p in list_checkpoints(run_dir)}
    for part in glob.glob(os.path.join(glob.escape(run_dir), "*_*.h5")):
        m = PART_RE.match(os.path.basename(part))
        if m and m.group(2) not in steps:
            _remove_quietly(part)


def list_checkpoints(run_dir: str):
    found = [p for p in glob.glob(os.path.join(run_dir, "ckpt_*.h5")) if NAME_RE.search(p)]
    return sorted(found, key=lambda p: int(NAME_RE.search(p).group(1)))


def latest(run_dir: str):
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _damaged(path, err):
    return UserError(f"checkpoint {path} is damaged ({err}); delete it to resume from an older one")


def _check_digest(dataset, value, path):
    expected = dataset.attrs.get("sha256")
    if expected is not None and _digest(value) != expected:
        raise UserError(f"checkpoint {path} is damaged (checksum mismatch in {dataset.name})")


def check_files(path, files):
    """Read every dataset of `files` (the parts of checkpoint `path`) and check its checksum."""
    for file in sorted(files):
        try:
            with h5py.File(file, "r") as f:
                f.visititems(lambda name, obj: _check_digest(obj, obj[()], path)
                             if isinstance(obj, h5py.Dataset) else None)
        except OSError as err:
            raise _damaged(path, err) from None

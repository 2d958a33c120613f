"""HDF5 checkpoints under the HF parameter names, one file per pipeline stage joined by a
manifest, written atomically, loaded without pickle, readable by any layout.

runs/NAME/ckpt_STEP.h5, the manifest (format_version 2):
  attrs: format_version, step, config (the resolved job as TOML), world_size, mode, pipeline
         (stages S), data_world (replicas D), stage_files (names of the stage files) and any
         extra scalars the trainer adds (e.g. the async version counter)
  /sampler_rank{d}/KEY   each data replica's sampler state (cursors of the sharded strategies)
  /optim_rank{r}/KEY     async mode: each worker's own optimizer state (flat, whole model)
  /balancer/KEY          work-allocation state
runs/NAME/stage{s}_STEP.h5, one per stage, written by that stage's rank of replica 0 (named so
that `ckpt_*.h5` finds the manifests only):
  /params/NAME           the stage's parameters, one dataset per HF name (the LM head's tied
                         copy of wte is not written twice: the first stage has wte)
  /optim/KEY/NAME        sync mode: its optimizer state by name (AdamW m, v; SGD's buffer);
                         attr optim_step
Every dataset carries the sha256 of its bytes; reading checks it, and `verify` reads everything, so
a damaged checkpoint is found before training resumes from it (format 1 had no checksums).
Why files joined by a manifest, not one file or an HDF5 virtual dataset: each stage writes only
what it holds (no rank ever gathers the whole model, and h5py from PyPI has no parallel HDF5),
and a reader of any layout opens only the files that hold its names. Every file is written to a
temporary name, fsynced and renamed; the manifest comes last, so a checkpoint exists only once
all of its parts do. Format 1 checkpoints (one flat /params buffer) are read too, their flat
buffers cut into names by the model config they carry.
"""
import glob
import hashlib
import os
import re

import h5py
import numpy as np

from .. import config as config_mod
from ..errors import UserError
from ..model.gpt import gpt2_layout

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
NAME_RE = re.compile(r"ckpt_(\d+)\.h5$")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_{step:07d}.h5")


def stage_path(path: str, stage: int) -> str:
    """The file of `stage` beside the manifest `path` (runs/NAME/ckpt_STEP.h5 -> stageS_STEP.h5)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"stage{stage}_{NAME_RE.search(name).group(1)}.h5")


def _digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _write_group(f, name, d):
    """One dataset per entry, each with the sha256 of its bytes (checked whenever it is read)."""
    g = f.create_group(name)
    for k, v in d.items():
        ds = g.create_dataset(k, data=np.asarray(v))
        ds.attrs["sha256"] = _digest(ds[()])


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


def save_stage(path, params, optim=None, optim_step=0):
    """One stage's file: params {name: host array}; optim {key: {name: host array}}."""
    def fill(f):
        _write_group(f, "params", params)
        for key, named in (optim or {}).items():
            _write_group(f, f"optim/{key}", named)
        f.attrs["optim_step"] = int(optim_step)
    return _atomic_h5(path, fill)


def save_manifest(path, step, job, stages, per_rank=None, balancer=None, attrs=None):
    """The manifest, once every stage file in `stages` (their paths) is in place."""
    def fill(f):
        for prefix, states in (per_rank or {}).items():
            for r, st in enumerate(states):
                _write_group(f, f"{prefix}_rank{r}", st or {})
        if balancer:
            _write_group(f, "balancer", balancer)
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["step"] = int(step)
        f.attrs["config"] = config_mod.to_toml(job)
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
    """A checkpoint: its manifest, then its stage files."""
    os.remove(path)
    folder, name = os.path.split(path)
    for part in glob.glob(os.path.join(glob.escape(folder), f"stage*_{NAME_RE.search(name).group(1)}.h5")):
        os.remove(part)


def list_checkpoints(run_dir: str):
    found = [p for p in glob.glob(os.path.join(run_dir, "ckpt_*.h5")) if NAME_RE.search(p)]
    return sorted(found, key=lambda p: int(NAME_RE.search(p).group(1)))


def latest(run_dir: str):
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _read_group(f, name):
    return {k: f[name][k][()] for k in f[name]} if name in f else {}


def _damaged(path, err):
    return UserError(f"checkpoint {path} is damaged ({err}); delete it to resume from an older one")


class Checkpoint:
    """A checkpoint's metadata (step, config, attrs, per_rank, balancer) and its parameters and
    optimizer state by name, read on demand: `params(names)`, `optim(names)`, `optim_step`."""

    def __init__(self, path, meta, sources):
        self.path = path
        self.step, self.config, self.attrs = meta["step"], meta["config"], meta["attrs"]
        self.per_rank, self.balancer = meta["per_rank"], meta["balancer"]
        self._sources = sources  # name -> (file, dataset path, flat span or None) per kind
        self.optim_step = meta["optim_step"]

    def names(self):
        return list(self._sources["params"])

    def params(self, names):
        return self._read("params", names)

    def optim(self, names):
        """{key: {name: array}} for the optimizer keys the checkpoint holds (none for async runs)."""
        return {key: self._read(key, names) for key in self._sources if key != "params"}

    def _read(self, kind, names):
        table = self._sources[kind]
        missing = [n for n in names if n not in table]
        if missing:
            raise UserError(f"checkpoint {self.path} has no {kind} for {missing[0]} (and {len(missing) - 1} more); "
                            "it was written for another model")
        out = {}
        try:
            for name in names:
                file, dataset, span = table[name]
                with h5py.File(file, "r") as f:  # a format-1 span is (lo, hi, shape)
                    out[name] = f[dataset][()] if span is None else f[dataset][span[0]:span[1]].reshape(span[2])
                    _check_digest(f[dataset], out[name], self.path)
        except (OSError, KeyError) as err:
            raise _damaged(self.path, err) from None
        return out


def _check_digest(dataset, value, path):
    expected = dataset.attrs.get("sha256")
    if expected is not None and _digest(value) != expected:
        raise UserError(f"checkpoint {path} is damaged (checksum mismatch in {dataset.name})")


def verify(path):
    """Read every dataset of the checkpoint (manifest and stage files) and check its checksum;
    a UserError names the first problem."""
    ck = load(path)
    files = {path} | {src[0] for table in ck._sources.values() for src in table.values()}
    for file in sorted(files):
        try:
            with h5py.File(file, "r") as f:
                f.visititems(lambda name, obj: _check_digest(obj, obj[()], path)
                             if isinstance(obj, h5py.Dataset) else None)
        except OSError as err:
            raise _damaged(path, err) from None
    return ck


def load(path: str) -> Checkpoint:
    """Open a checkpoint (manifest and stage files); any problem is one UserError line."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the run name or drop --resume")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        if "unable to lock file" in str(err).lower():  # HDF5's own locking: a writer still has it open
            raise UserError(f"checkpoint {path} is locked by another process ({err}); if no job uses it, "
                            "on file systems without flock set HDF5_USE_FILE_LOCKING=FALSE") from None
        raise UserError(f"checkpoint {path} is not a readable HDF5 file (corrupt or truncated); "
                        "delete it to resume from an older one") from None
    with f:
        version = f.attrs.get("format_version")
        if version not in READABLE_VERSIONS:
            raise UserError(f"checkpoint {path} has format version {version}, this llmpi reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
        if "config" not in f.attrs or (version == 1 and "params" not in f):
            raise UserError(f"checkpoint {path} lacks params or config; it is not an llmpi checkpoint")
        try:
            meta = {"step": int(f.attrs["step"]), "config": config_mod.from_toml_text(f.attrs["config"]),
                    "balancer": _read_group(f, "balancer"), "attrs": {k: f.attrs[k] for k in f.attrs},
                    "per_rank": {}, "optim_step": 0}
            for name in f:
                m = re.match(r"(\w+)_rank(\d+)$", name)
                if m:
                    meta["per_rank"].setdefault(m.group(1), {})[int(m.group(2))] = _read_group(f, name)
            sources = _v1_sources(path, f, meta) if version == 1 else _v2_sources(path, f, meta)
        except (OSError, KeyError, ValueError, TypeError) as err:  # TOMLDecodeError is a ValueError
            raise _damaged(path, err) from None
    return Checkpoint(path, meta, sources)


def _v1_sources(path, f, meta):
    """Format 1: flat buffers in the whole model's layout order, cut into names."""
    layout = gpt2_layout(meta["config"].model)
    spans, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        spans[name] = (offset, offset + size, shape)
        offset += size
    if f["params"].shape != (offset,):
        raise ValueError(f"{f['params'].shape[0]:,} parameters where its model config has {offset:,}")
    sources = {"params": {n: (path, "params", spans[n]) for n, _ in layout}}
    for key in f.get("optim", {}):
        if key != "step":
            sources[key] = {n: (path, f"optim/{key}", spans[n]) for n, _ in layout}
    if "optim" in f and "step" in f["optim"]:
        meta["optim_step"] = int(f["optim"]["step"][()])
    return sources


def _v2_sources(path, f, meta):
    sources = {"params": {}}
    folder = os.path.dirname(os.path.abspath(path))
    for stage_file in f.attrs["stage_files"]:
        part = os.path.join(folder, str(stage_file))
        if not os.path.isfile(part):
            raise OSError(f"its stage file {part} is missing")
        with h5py.File(part, "r") as g:
            for name in g["params"]:
                sources["params"].setdefault(name, (part, f"params/{name}", None))
            for key in g.get("optim", {}):
                table = sources.setdefault(key, {})
                for name in g["optim"][key]:
                    table.setdefault(name, (part, f"optim/{key}/{name}", None))
            meta["optim_step"] = int(g.attrs.get("optim_step", 0))
    return sources


def load_latest(run_dir: str) -> Checkpoint:
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

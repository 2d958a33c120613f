"""HDF5 checkpoints under the HF parameter names, one file per pipeline stage joined by a
manifest, written atomically (llmpi.training.ckpt_files), loaded without pickle, readable by any layout.

runs/NAME/ckpt_STEP.h5, the manifest (format_version 2):
  attrs: format_version, step, config (the resolved job as TOML), world_size, mode, pipeline
         (stages S), data_world (replicas D), stage_files (names of the stage files) and any
         extra scalars the trainer adds (e.g. the async version counter)
  /sampler_rank{d}/KEY   each data replica's sampler state (cursors of the sharded strategies)
  /optim_rank{r}/KEY     async mode: each worker's own optimizer state (flat, whole model)
  /balancer/KEY          work-allocation state
  rank_files             async periodic checkpoints: the per-rank groups are in rank{r}_STEP.h5, one
                         per rank, each written by its rank (no gather in the loop), not here
runs/NAME/stage{s}_STEP.h5, one per stage, written by that stage's rank of replica 0 (named so
that `ckpt_*.h5` finds the manifests only); with tensor parallelism one per shard,
stage{s}.t{k}_STEP.h5 (attrs tensor_rank k, tensor_size K), holding that rank's shards (each with
attr full_shape; llmpi.parallel.tensor.unshard joins the K pieces for a reader of any K) and, in
shard 0's file only, the replicated parameters:
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
import os
import re

import h5py
import numpy as np

from .. import config as config_mod
from ..errors import UserError
from ..model.gpt import gpt2_layout
from ..parallel.tensor import unshard
# the file operations live there (re-exported here for the trainer and tools)
from .ckpt_files import (FORMAT_VERSION, NAME_RE, _check_digest, _damaged, check_files, checkpoint_path,  # noqa: F401
                         claim, latest, list_checkpoints, prune, rank_path, remove, remove_incomplete,
                         save_manifest_text, save_rank_part, save_stage, stage_path)

READABLE_VERSIONS = (1, 2)


def save_manifest(path, step, job, stages, per_rank=None, balancer=None, attrs=None):
    """The manifest, once every stage file in `stages` (their paths) is in place."""
    return save_manifest_text(path, step, config_mod.to_toml(job), stages, per_rank, balancer, attrs)


def _read_group(f, name):
    return {k: f[name][k][()] for k in f[name]} if name in f else {}


class Checkpoint:
    """A checkpoint's metadata (step, config, attrs, per_rank, balancer) and its parameters and
    optimizer state by name, read on demand: `params(names)`, `optim(names)`, `optim_step`."""

    def __init__(self, path, meta, sources):
        self.path = path
        self.step, self.config, self.attrs = meta["step"], meta["config"], meta["attrs"]
        self.per_rank, self.balancer = meta["per_rank"], meta["balancer"]
        self.rank_files = meta["rank_files"]  # the files of the per-rank groups, if not the manifest
        # name -> (file, dataset path, flat span or None) per kind; for a tensor-sharded name the
        # file and dataset are tuples over its shards in rank order and the span is "shards"
        self._sources = sources
        self.optim_step = meta["optim_step"]

    def names(self):
        return list(self._sources["params"])

    def params(self, names):
        return dict(self.each("params", names))

    def optim_keys(self):
        """The optimizer's state keys the checkpoint holds (none for async runs)."""
        return [key for key in self._sources if key != "params"]

    def each(self, kind, names):
        """(name, whole array) of `kind` ("params" or an optimizer key), one name at a time, so a
        reader that keeps only its shard of each never holds the whole stage."""
        table = self._sources[kind]
        missing = [n for n in names if n not in table]
        if missing:
            raise UserError(f"checkpoint {self.path} has no {kind} for {missing[0]} (and {len(missing) - 1} more); "
                            "it was written for another model")
        for name in names:
            file, dataset, span = table[name]
            try:
                if span == "shards":
                    value = self._joined(name, file, dataset)
                else:
                    with h5py.File(file, "r") as f:  # a format-1 span is (lo, hi, shape)
                        value = f[dataset][()] if span is None else f[dataset][span[0]:span[1]].reshape(span[2])
                        _check_digest(f[dataset], value, self.path)
            except (OSError, KeyError) as err:
                raise _damaged(self.path, err) from None
            yield name, value

    def _joined(self, name, files, datasets):
        """The whole parameter from its tensor shards (one at a time: never the whole model)."""
        pieces, full_shape = [], None
        for file, dataset in zip(files, datasets):
            with h5py.File(file, "r") as f:
                pieces.append(f[dataset][()])
                _check_digest(f[dataset], pieces[-1], self.path)
                full_shape = tuple(int(n) for n in f[dataset].attrs["full_shape"])
        return unshard(name, pieces, full_shape)


def verify(path):
    """Read every dataset of the checkpoint (manifest and stage files) and check its checksum;
    a UserError names the first problem."""
    ck = load(path)
    check_files(path, {path, *ck.rank_files} | {file for table in ck._sources.values() for src in table.values()
                                                for file in (src[0] if src[2] == "shards" else (src[0],))})
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
                    "per_rank": {}, "optim_step": 0, "rank_files": []}
            _read_per_rank(f, meta["per_rank"])
            for name in f.attrs.get("rank_files", []):
                part = os.path.join(os.path.dirname(os.path.abspath(path)), str(name))
                if not os.path.isfile(part):
                    raise OSError(f"its rank file {part} is missing")
                with h5py.File(part, "r") as g:
                    _read_per_rank(g, meta["per_rank"])
                meta["rank_files"].append(part)
            sources = _v1_sources(path, f, meta) if version == 1 else _v2_sources(path, f, meta)
        except (OSError, KeyError, ValueError, TypeError) as err:  # TOMLDecodeError is a ValueError
            raise _damaged(path, err) from None
    return Checkpoint(path, meta, sources)


def _read_per_rank(f, per_rank):
    for name in f:
        m = re.match(r"(\w+)_rank(\d+)$", name)
        if m:
            per_rank.setdefault(m.group(1), {})[int(m.group(2))] = _read_group(f, name)


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
    sources, shards = {"params": {}}, {}  # shards: (kind, name) -> {k: (file, dataset)}, K
    folder = os.path.dirname(os.path.abspath(path))
    for stage_file in f.attrs["stage_files"]:
        part = os.path.join(folder, str(stage_file))
        if not os.path.isfile(part):
            raise OSError(f"its stage file {part} is missing")
        with h5py.File(part, "r") as g:
            k, K = int(g.attrs.get("tensor_rank", 0)), int(g.attrs.get("tensor_size", 1))
            groups = [("params", g["params"], "params")]
            groups += [(key, g["optim"][key], f"optim/{key}") for key in g.get("optim", {})]
            for kind, group, prefix in groups:
                table = sources.setdefault(kind, {})
                for name in group:
                    if "full_shape" in group[name].attrs:
                        pieces, _ = shards.setdefault((kind, name), ({}, K))
                        pieces.setdefault(k, (part, f"{prefix}/{name}"))
                    else:
                        table.setdefault(name, (part, f"{prefix}/{name}", None))
            meta["optim_step"] = int(g.attrs.get("optim_step", 0))
    for (kind, name), (pieces, K) in shards.items():
        if sorted(pieces) != list(range(K)):
            raise OSError(f"{name} has {len(pieces)} of its {K} tensor shards")
        files, datasets = zip(*(pieces[k] for k in range(K)))
        sources[kind].setdefault(name, (files, datasets, "shards"))
    return sources


def load_latest(run_dir: str) -> Checkpoint:
    path = latest(run_dir)
    if path is None:
        raise UserError(f"no checkpoint (ckpt_*.h5) in {run_dir}; train first or check the path")
    return load(path)


# model keys that say how backward is computed, not what the weights are: free to change on resume
NOT_THE_WEIGHTS = ("recompute",)


def check_model_matches(ckpt_job, job, path: str):
    """Refuse a checkpoint whose model config differs from the job's, naming the keys."""
    a, b = config_mod.to_dict(ckpt_job)["model"], config_mod.to_dict(job)["model"]
    diff = [f"model.{k} (checkpoint {a[k]!r}, job {b[k]!r})" for k in a
            if a[k] != b[k] and k not in NOT_THE_WEIGHTS]
    if diff:
        raise UserError(f"checkpoint {path} was made with a different model config: {'; '.join(diff)}; "
                        "use the same model settings or start a new run name")

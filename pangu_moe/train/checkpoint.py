"""Checkpoints: every Parameter of the given cells (model weights, RRE tables, optimizer moments)
plus a few integers of trainer state, written atomically (temp file, fsync, rename).

Single-process runs write one file `step_XXXXXX.ckpt`. Runs with one rank per process write a folder
`step_XXXXXX/`: `shared.ckpt` (rank 0: every non-expert parameter and moment, and the trainer state),
`experts_rank{r}.ckpt` (rank r's expert shard and its moments) and, last, `manifest.json` naming the
expert ids of each shard; a folder without a manifest is incomplete and ignored. A sharded
checkpoint loads into a rank (its shard) or into a single-process model (shards concatenated).
"""
import glob
import json
import os
import re
import shutil

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe.model.pangu import is_expert_parameter

MANIFEST = "manifest.json"
SHARED = "shared.ckpt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _named_parameters(cells):
    params = {}
    for cell in cells:
        for p in cell.get_parameters():
            params.setdefault(p.name, p)
    return params


def save(path, cells, state):
    """Write `path` (a .ckpt) atomically.

    Args:
        cells: cells whose Parameters are saved (duplicates by name are saved once).
        state: {name: int or float} trainer state stored beside the parameters.
    """
    _write(path, _named_parameters(cells), state)


def _write(path, params, state):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[:-len(".ckpt")] + ".tmp.ckpt"
    items = [{"name": name, "data": p} for name, p in params.items()]
    ms.save_checkpoint(items, tmp, append_dict=dict(state))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    _replace_durably(tmp, path)


def _replace_durably(tmp, path):
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


def shard_file(rank):
    return f"experts_rank{rank}.ckpt"


def save_sharded(folder, cells, state, rank, shards, barrier):
    """Write this rank's part of a sharded checkpoint folder; rank 0 writes the manifest once all are done.

    Args:
        folder: `step_path(run_dir, step, sharded=True)`; cells, state: as `save`.
        rank: this process's rank; shards: list over ranks of the expert ids each holds.
        barrier: callable returning once every rank has called it.
    """
    params = _named_parameters(cells)
    _write(os.path.join(folder, shard_file(rank)), {n: p for n, p in params.items() if is_expert_parameter(n)}, {})
    if rank == 0:
        _write(os.path.join(folder, SHARED), {n: p for n, p in params.items() if not is_expert_parameter(n)}, state)
    barrier()
    if rank == 0:
        manifest = {"world_size": len(shards), "shared": SHARED,
                    "shards": [{"rank": r, "file": shard_file(r), "experts": [int(e) for e in ids]}
                               for r, ids in enumerate(shards)]}
        tmp = os.path.join(folder, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _replace_durably(tmp, os.path.join(folder, MANIFEST))
    barrier()


def _read(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return ms.load_checkpoint(path)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable ({' '.join(str(e).split())[:200]})") from None


def _read_sharded(folder, rank, world_size):
    """The parameters of a sharded checkpoint folder: shared ones plus rank `rank`'s shard (of a run with
    `world_size` ranks), or plus every shard concatenated on the expert axis (rank None)."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {folder}: no {MANIFEST} (an incomplete sharded checkpoint)")
    with open(manifest_path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    shards = manifest["shards"]
    saved = dict(_read(os.path.join(folder, manifest["shared"])))
    if rank is not None:
        if len(shards) != world_size or shards[rank]["rank"] != rank:
            raise CheckpointError(f"checkpoint {folder}: written by {len(shards)} ranks, this run has {world_size}; "
                                  f"resume with the same parallel layout, or join the shards with "
                                  f"parallel.dispatch=simulated")
        saved.update(_read(os.path.join(folder, shards[rank]["file"])))
        return saved
    order = [e for shard in shards for e in shard["experts"]]
    if order != list(range(len(order))):
        raise CheckpointError(f"checkpoint {folder}: shard expert ids {order} are not 0..{len(order) - 1} in order")
    parts = [_read(os.path.join(folder, shard["file"])) for shard in shards]
    for name in parts[0]:
        # (E, ...) <- W x (E_loc, ...)
        saved[name] = Tensor(np.concatenate([part[name].asnumpy() for part in parts], 0))
    return saved


def load(path, cells, state_keys, rank=None, world_size=1):
    """Load `path` (a .ckpt file or a sharded checkpoint folder) into `cells`; every Parameter must be
    present with the same shape.

    `rank`: for a sharded folder, load that rank's expert shard (the cells hold one rank of `world_size`),
    or None to concatenate all shards (the cells hold every expert).
    Everything is checked before anything is written, so a failed load leaves the cells unchanged.
    Returns: {key: value} for `state_keys`.
    """
    saved = _read_sharded(path, rank, world_size) if os.path.isdir(path) else _read(path)
    params = _named_parameters(cells)
    missing = [n for n in params if n not in saved]
    if missing:
        raise CheckpointError(f"checkpoint {path}: lacks {len(missing)} parameters of this model, e.g. {missing[0]}")
    for name, p in params.items():
        if tuple(saved[name].shape) != tuple(p.shape):
            raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, the model "
                                  f"needs {tuple(p.shape)}")
    extra = [n for n in saved if n not in params and n not in state_keys]
    if extra:
        raise CheckpointError(f"checkpoint {path}: has {len(extra)} parameters this model lacks, e.g. {extra[0]}")
    missing_state = [k for k in state_keys if k not in saved]
    if missing_state:
        raise CheckpointError(f"checkpoint {path}: lacks trainer state {missing_state[0]}")
    for name, p in params.items():
        p.set_data(saved[name].astype(p.dtype))
    return {k: saved[k].asnumpy().item() for k in state_keys}


def step_path(run_dir, step, sharded=False):
    """The checkpoint of `step`: a .ckpt file, or a folder when `sharded`."""
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}" + ("" if sharded else ".ckpt"))


def list_checkpoints(run_dir):
    """[(step, path)] of the run's complete checkpoints (files, and sharded folders with a manifest), ascending."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")):
        m = re.fullmatch(r"step_(\d+)(\.ckpt)?", os.path.basename(path))
        if m and (os.path.isfile(path) if m.group(2) else os.path.isfile(os.path.join(path, MANIFEST))):
            found.append((int(m.group(1)), path))
    return sorted(found)


def remove(path):
    """Delete a checkpoint file or sharded folder (its manifest first, so an interrupted delete never
    leaves a folder that looks complete)."""
    if os.path.isdir(path):
        manifest = os.path.join(path, MANIFEST)
        if os.path.exists(manifest):
            os.remove(manifest)
        shutil.rmtree(path)
    else:
        os.remove(path)

"""Checkpoints: every Parameter of the given cells (model weights, router state, optimizer moments) plus
the trainer state, in a folder per step that is complete only once its manifest exists.

`RUN_DIR/checkpoints/step_NNNNNN/`:
- `shared.ckpt`: every non-expert parameter and moment, and the trainer state;
- `experts_rank{r}.ckpt`: expert shard r (its experts' weights and moments); a single-process run
  writes one shard holding every expert, a run with one rank per process one shard per rank;
- with `runtime.checkpoint_format: safetensors` the same files as `.safetensors` (MindSpore writes both; the
  manifest names the files, so a folder of either format loads);
- `manifest.json`, written last: the step, the sha256 of the resolved config's trajectory fields, and
  per file its size and sha256, and per shard its expert ids.

Every file is written atomically (temp file, fsync, rename, fsync of the folder). Loading verifies
sizes, checksums and that every expert is present exactly once before anything is read, so a
truncated or bit-flipped file is an error naming it, and `newest_valid` lets a resume fall back to the
previous checkpoint. No checkpoint with a non-finite value is written. A bare `.ckpt` file (a
consolidated checkpoint, `save_file`) also loads, unverified: it has no manifest.
"""
import glob
import json
import os
import re
import shutil
import threading

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe.config import one_line
from pangu_moe.model.pangu import is_expert_parameter
from pangu_moe.data.prepare import fsync_path, sha256_file
from pangu_moe.routing.base import is_noise_buffer

MANIFEST = "manifest.json"
FORMAT = 2
EXTENSIONS = {"ckpt": ".ckpt", "safetensors": ".safetensors"}  # runtime.checkpoint_format -> file extension


def _read_umask():
    mask = os.umask(0)  # reading it means setting it: done once, at import, before any writer thread exists
    os.umask(mask)
    return mask


UMASK = _read_umask()


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def named_parameters(cells):
    """{name: Parameter} of the cells (a name shared by several cells counts once), without the routers'
    noise buffers, which hold one step's draw (`routing.base.is_noise_buffer`)."""
    params = {}
    for cell in cells:
        for p in cell.get_parameters():
            if not is_noise_buffer(p.name):
                params.setdefault(p.name, p)
    return params


def shard_file(rank, file_format="ckpt"):
    return f"experts_rank{rank}{EXTENSIONS[file_format]}"


def shared_file(file_format="ckpt"):
    return "shared" + EXTENSIONS[file_format]


def _format_of(path):
    """The `EXTENSIONS` format of a checkpoint file, by its extension (MindSpore's .ckpt otherwise)."""
    return "safetensors" if path.endswith(EXTENSIONS["safetensors"]) else "ckpt"


def run_dir_of(path):
    """The run directory of a checkpoint: RUN_DIR of RUN_DIR/checkpoints/step_N/, or the folder of a bare
    .ckpt file that has a config.yaml beside it (`pangu-moe ckpt reshard --consolidate` writes one)."""
    path = os.path.abspath(path.rstrip("/"))
    here = os.path.dirname(path)
    if os.path.isfile(path) and os.path.isfile(os.path.join(here, "config.yaml")):
        return here
    return os.path.dirname(here)


def step_path(run_dir, step):
    """The checkpoint folder of `step`."""
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


def _check_finite(path, arrays):
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise FloatingPointError(f"refusing to write checkpoint {path}: {name} holds non-finite values")


def write_arrays(path, arrays, state):
    """Write {name: numpy array or Parameter} and the state dict to `path` atomically; returns its file entry."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    file_format = _format_of(path)
    tmp = path + ".tmp" + EXTENSIONS[file_format]  # MindSpore appends its extension to any other name
    items = [{"name": name, "data": value if isinstance(value, ms.Parameter) else Tensor(value)}
             for name, value in arrays.items()]
    ms.save_checkpoint(items, tmp, append_dict=dict(state), format=file_format)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    # MindSpore writes checkpoints owner-read-only (0400): teammates on a shared cluster could not read them and
    # copies kept the mode. They get the mode of every other file of the run (0666 less the umask); the manifest's
    # sha256 is what guards them against change.
    os.chmod(tmp, 0o666 & ~UMASK)
    _replace_durably(tmp, path)
    return file_entry(path)


def _replace_durably(tmp, path):
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))  # make the rename itself durable


def file_entry(path):
    """{"file": base name, "bytes": size, "sha256": hex digest} of a written file."""
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _replace_durably(tmp, path)


def save_file(path, cells, state):
    """One bare .ckpt file with every parameter of `cells` and `state` (no manifest; see the module doc)."""
    params = named_parameters(cells)
    _check_finite(path, {n: p.asnumpy() for n, p in params.items()})
    write_arrays(path, params, state)


def save(folder, cells, state, config_sha256, rank=0, shards=None, barrier=None, file_format="ckpt"):
    """Write this process's part of the checkpoint folder; rank 0 writes the manifest once all are done.

    Args:
        folder: `step_path(run_dir, step)`; cells: cells whose Parameters are saved;
        state: {name: int or float} trainer state (with "step"); config_sha256: `config_fingerprint` of the run.
        rank: this process's rank; shards: list over ranks of the expert rows each holds (default: one shard,
            this process holding every expert): expert ids, or slots when the run places its experts (the rows
            are then in slot order, as a one-process model holds them); barrier: callable returning once every rank
            called it;
        file_format: an `EXTENSIONS` key (`runtime.checkpoint_format`).
    Raises:
        FloatingPointError when a parameter holds a non-finite value (nothing is written).
    """
    write(folder, snapshot(folder, cells, copy=False), state, config_sha256, rank, shards, barrier, file_format)


def snapshot(folder, cells, copy=True):
    """{name: numpy array} of every Parameter of `cells`; with `copy`, arrays that later training steps leave
    unchanged (`asnumpy` of a CPU tensor may share its memory), for a write in the background. Raises
    FloatingPointError naming the first non-finite one (the checkpoint `folder` is not written)."""
    arrays = {n: p.asnumpy().copy() if copy else p.asnumpy() for n, p in named_parameters(cells).items()}
    _check_finite(folder, arrays)
    return arrays


def write(folder, arrays, state, config_sha256, rank=0, shards=None, barrier=None, file_format="ckpt"):
    """`save` of a `snapshot`: the files of this rank, then (rank 0, after `barrier`) the manifest."""
    experts = {n: v for n, v in arrays.items() if is_expert_parameter(n)}
    if shards is None:  # one process holding every expert: one shard, or none for a model without experts
        shards = [list(range(next(iter(experts.values())).shape[0]))] if experts else []
    barrier = barrier or (lambda: None)
    if experts:
        write_arrays(os.path.join(folder, shard_file(rank, file_format)), experts, {})
    if rank == 0:
        shared = write_arrays(os.path.join(folder, shared_file(file_format)),
                              {n: v for n, v in arrays.items() if n not in experts}, state)
    barrier()
    if rank == 0:
        write_manifest(folder, state["step"], config_sha256, shared,
                       [{"rank": r, "experts": ids, **file_entry(os.path.join(folder, shard_file(r, file_format)))}
                        for r, ids in enumerate(shards)])
    barrier()


class BackgroundWrite(threading.Thread):
    """Runs `work()` (a `write` of a `snapshot`, then whatever must follow it) while training continues; `wait`
    joins it and re-raises what it raised. Only for a process that holds every rank: `write`'s barrier would
    be a collective from a second thread."""

    def __init__(self, work):
        super().__init__(daemon=False)
        self.work, self.error = work, None
        self.start()

    def run(self):
        try:
            self.work()
        except BaseException as e:  # re-raised in the training thread by `wait`
            self.error = e

    def wait(self):
        self.join()
        if self.error is not None:
            raise self.error


def write_manifest(folder, step, config_sha256, shared, shards):
    """Write the manifest last, making the folder a complete checkpoint.

    Args: shared: `file_entry` of shared.ckpt; shards: list of {"rank", "experts", **file_entry}.
    """
    manifest = {"format": FORMAT, "step": int(step), "config_sha256": config_sha256, "shared": shared,
                "shards": [{**shard, "experts": [int(e) for e in shard["experts"]]} for shard in shards]}
    _write_json(os.path.join(folder, MANIFEST), manifest)


def read_manifest(folder):
    """The manifest of a checkpoint folder, checked for shape (not yet against the files)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {folder}: no {MANIFEST} (an incomplete checkpoint)")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        shards = manifest["shards"]
        entries = [manifest["shared"], *shards]
        if manifest.get("format") != FORMAT or not all({"file", "bytes", "sha256"} <= set(e) for e in entries):
            raise KeyError("format")
        experts = [e for shard in shards for e in shard["experts"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is not a format-{FORMAT} manifest") from None
    expected = list(range(len(experts)))
    if sorted(experts) != expected:
        duplicated = sorted({e for e in experts if experts.count(e) > 1})
        missing = sorted(set(expected) - set(experts)) or sorted(set(experts) - set(expected))
        raise CheckpointError(f"checkpoint {folder}: the manifest's shards hold experts {sorted(experts)}; every "
                              f"expert must appear exactly once ("
                              f"{'duplicated ' + str(duplicated) if duplicated else 'missing ' + str(missing)})")
    return manifest


def verify(folder, files=None):
    """Check a checkpoint folder against its manifest: every listed file (or only `files`) exists with
    the recorded size and sha256. Returns the manifest; raises CheckpointError naming the first problem."""
    manifest = read_manifest(folder)
    for entry in [manifest["shared"], *manifest["shards"]]:
        if files is not None and entry["file"] not in files:
            continue
        path = os.path.join(folder, entry["file"])
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {folder}: {entry['file']} is missing")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {folder}: {entry['file']} has {size} bytes, the manifest says "
                                  f"{entry['bytes']} (truncated or replaced)")
        if file_entry(path)["sha256"] != entry["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {entry['file']} does not match its sha256 in the manifest "
                                  f"(corrupted on disk)")
    return manifest


def _read(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return ms.load_checkpoint(path, format=_format_of(path))
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable ({one_line(e)})") from None


def read_shards(folder, manifest):
    """[{name: Tensor}] of every shard file, in manifest order."""
    return [_read(os.path.join(folder, shard["file"])) for shard in manifest["shards"]]


def _check_rows(folder, shard, tensors):
    """Each expert tensor of a shard must hold one row per expert its manifest entry lists."""
    for name, value in tensors.items():
        if value.shape[0] != len(shard["experts"]):
            raise CheckpointError(f"checkpoint {folder}: {shard['file']} holds {value.shape[0]} experts of {name}, "
                                  f"its manifest entry lists {len(shard['experts'])}")


def join_shards(folder, manifest, parts):
    """{name: numpy array} of every expert tensor with all E rows in order (expert order, or slot order for a run
    that places its experts), from the shards' tensors (`read_shards`). Each shard holds its rows in its `experts`
    order."""
    for shard, part in zip(manifest["shards"], parts):
        _check_rows(folder, shard, part)
    order = np.array([e for shard in manifest["shards"] for e in shard["experts"]], np.int64)
    return {name: np.concatenate([part[name].asnumpy() for part in parts], 0)[np.argsort(order, kind="stable")]
            for name in (parts[0] if parts else ())}  # (E, ...) <- rows in shard order


def read_saved(path, rank=None, world_size=1):
    """{name: Tensor or value} of a checkpoint: a verified folder (shared parameters plus rank `rank`'s shard
    of a run with `world_size` ranks, or plus every shard joined for rank None) or a bare .ckpt file."""
    if not os.path.isdir(path):
        return _read(path)
    manifest = read_manifest(path)
    shards = manifest["shards"]
    if rank is not None:
        if len(shards) != world_size or shards[rank]["rank"] != rank:
            raise CheckpointError(f"checkpoint {path}: holds {len(shards)} expert shards, this run has {world_size} "
                                  f"ranks; resume with the same parallel layout, convert it with pangu-moe ckpt "
                                  f"reshard, or join the shards with parallel.dispatch=simulated")
        verify(path, {manifest["shared"]["file"], shards[rank]["file"]})
        saved = dict(_read(os.path.join(path, manifest["shared"]["file"])))
        shard = _read(os.path.join(path, shards[rank]["file"]))
        _check_rows(path, shards[rank], shard)
        saved.update(shard)
        return saved
    verify(path)
    saved = dict(_read(os.path.join(path, manifest["shared"]["file"])))
    joined = join_shards(path, manifest, read_shards(path, manifest))
    saved.update({name: Tensor(value) for name, value in joined.items()})
    return saved


def load(path, cells, state_keys, rank=None, world_size=1):
    """Load `path` (a checkpoint folder or a bare .ckpt file) into `cells`; every Parameter must be present
    with the same shape.

    `rank`: for a folder, load that rank's expert shard (the cells hold one rank of `world_size`), or None
    to join all shards (the cells hold every expert).
    Everything is checked before anything is written, so a failed load leaves the cells unchanged.
    Returns: {key: value} for `state_keys`.
    """
    saved = read_saved(path, rank, world_size)
    params = named_parameters(cells)
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


def list_checkpoints(run_dir):
    """[(step, folder)] of the run's checkpoint folders that have a manifest (complete saves), ascending."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")):
        m = re.fullmatch(r"step_(\d+)", os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, MANIFEST)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def newest_valid(run_dir, log=None, option="--resume"):
    """(step, folder) of the newest checkpoint that passes `verify`; an invalid newer one is reported through
    `log` and skipped. Raises CheckpointError (naming the command-line `option`) when there is none."""
    found = list_checkpoints(run_dir)
    problems = []
    for step, path in reversed(found):
        try:
            verify(path)
            return step, path
        except CheckpointError as e:
            problems.append(str(e))
            if log:
                log(f"skipping {e}")
    where = os.path.join(run_dir, "checkpoints")
    raise CheckpointError(f"{option}: no valid checkpoint in {where}" + (f" ({problems[0]})" if problems else ""))


def resolve(path, log=None):
    """A `--checkpoint` argument as a checkpoint: a run directory (one holding checkpoints/), or its checkpoints/
    folder, stands for the run's newest valid checkpoint; a checkpoint folder (it holds a manifest) or a
    checkpoint file is returned unchanged. CheckpointError with one line for anything else, naming what to pass
    (a folder of run directories: the runs in it)."""
    kinds = "a run directory (it holds checkpoints/), one of its checkpoints/step_N folders, or a checkpoint file"
    if not os.path.exists(path):
        raise CheckpointError(f"--checkpoint {path}: no such file or folder; pass {kinds}")
    for run_dir in (path, os.path.dirname(os.path.abspath(path.rstrip("/")))):
        if os.path.isdir(os.path.join(run_dir, "checkpoints")) and (
                run_dir == path or os.path.basename(path.rstrip("/")) == "checkpoints"):
            return newest_valid(run_dir, log, "--checkpoint")[1]
    if os.path.isfile(os.path.join(path, MANIFEST)) or (
            os.path.isfile(path) and path.endswith(tuple(EXTENSIONS.values()))):
        return path
    runs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d, "checkpoints"))) \
        if os.path.isdir(path) else []
    if runs:
        raise CheckpointError(f"--checkpoint {path}: a folder of run directories ({', '.join(runs)}); pass one "
                              f"of them")
    raise CheckpointError(f"--checkpoint {path}: not a checkpoint; pass {kinds}")


def config_of(checkpoint_path):
    """The config.yaml of a checkpoint's run (`run_dir_of`); CheckpointError with one line when there is none
    (a checkpoint file copied out of its run)."""
    run_dir = run_dir_of(checkpoint_path)
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"checkpoint {checkpoint_path}: no config.yaml in its run directory {run_dir} (a "
                              f"checkpoint file needs its run's config.yaml beside it)")
    return config_path


def remove(path):
    """Delete a checkpoint folder (its manifest first, so an interrupted delete never leaves a folder that
    looks complete) or file."""
    if os.path.isdir(path):
        manifest = os.path.join(path, MANIFEST)
        if os.path.exists(manifest):
            os.remove(manifest)
        shutil.rmtree(path)
    else:
        os.remove(path)

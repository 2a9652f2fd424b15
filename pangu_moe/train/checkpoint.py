"""Checkpoints: every Parameter of the given cells (model weights, RRE tables, optimizer moments)
plus a few integers of trainer state, written atomically (temp file, fsync, rename)."""
import glob
import os
import re

import mindspore as ms


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[:-len(".ckpt")] + ".tmp.ckpt"
    items = [{"name": name, "data": p} for name, p in _named_parameters(cells).items()]
    ms.save_checkpoint(items, tmp, append_dict=dict(state))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


def load(path, cells, state_keys):
    """Load `path` into `cells`; every Parameter must be present with the same shape.

    Everything is checked before anything is written, so a failed load leaves the cells unchanged.
    Returns: {key: value} for `state_keys`.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        saved = ms.load_checkpoint(path)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable ({' '.join(str(e).split())[:200]})") from None
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


def step_path(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}.ckpt")


def list_checkpoints(run_dir):
    """[(step, path)] of the run's checkpoints, ascending."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "step_*.ckpt")):
        m = re.fullmatch(r"step_(\d+)\.ckpt", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)

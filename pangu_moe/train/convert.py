"""`pangu-moe ckpt`: converting checkpoints between expert-parallel degrees, and cutting out a domain.

Both write a run directory (OUT/config.yaml plus the checkpoint), so `eval`, `generate` and
`train --resume --out OUT` use the result like any run's:
- `reshard`: OUT/checkpoints/step_N/ with W2 expert shards (rank r holding experts
  [r*E/W2, (r+1)*E/W2)), or with `consolidate` one bare file OUT/model.ckpt (OUT/model.safetensors when
  the run's `runtime.checkpoint_format` is safetensors). Every tensor is copied, not
  recomputed: shards are joined in expert order and split again, so 4 -> 2 -> 4 reproduces each bit.
  The config gets a parallel layout of W2 ranks (the source's node count if W2 allows, else its
  devices per node, else one node); a consolidated file keeps the source's layout. Either gets the
  `simulated` backend when one process will hold every expert (W2 = 1, or consolidated) of a
  multi-process run. A run that places its experts (parallel.placement*) keeps each layer's slot map: on
  a new world size the slots' rows are hosted by new ranks, the routers' locality masks follow, and the
  window of kept choices towards the next re-placement starts again (`_placement_for_layout`).
- `extract_domain`: the PanGu-Σ sub-model of one domain (`model.pangu.extract_domain`: dense layers plus
  the domain's expert group, with its optimizer moments), with `moe.num_groups = 1` and E_g experts, in
  expert order whatever the run's placement, and no placement of its own.
"""
import dataclasses
import os
import shutil

import numpy as np
from mindspore import Tensor

from pangu_moe.config import MULTI_PROCESS_BACKENDS, ConfigError, RunConfig
from pangu_moe.data.source import RUN_FILES
from pangu_moe.dispatch.placement import expert_ranks, slots_from_ranks
from pangu_moe.dispatch.topology import Topology
from pangu_moe.model.pangu import domain_slice, extract_domain, in_expert_order, is_expert_parameter
from pangu_moe.train import checkpoint
from pangu_moe.train.optim import HybridEpsAdamW
from pangu_moe.train.restore import restore, run_config

MOMENT_PREFIXES = ("adam_m.", "adam_v.")


def _layout(cfg, world):
    """(nodes, devices_per_node) for `world` ranks, as close to cfg's layout as divisibility allows."""
    p = cfg.parallel
    if world % p.nodes == 0:
        return p.nodes, world // p.nodes
    if world % p.devices_per_node == 0:
        return world // p.devices_per_node, p.devices_per_node
    return 1, world


def read_all(path):
    """({name: numpy} of non-expert entries incl. trainer state, {name: numpy [E, ...]} of expert tensors)."""
    if os.path.isdir(path):
        manifest = checkpoint.verify(path)
        shared = checkpoint.read_saved(os.path.join(path, manifest["shared"]["file"]))
        experts = checkpoint.join_shards(path, manifest, checkpoint.read_shards(path, manifest))
    else:
        saved = checkpoint.read_saved(path)
        shared = {n: v for n, v in saved.items() if not is_expert_parameter(n)}
        experts = {n: v.asnumpy() for n, v in saved.items() if is_expert_parameter(n)}
    return {n: v.asnumpy() for n, v in shared.items()}, experts


def _placement_for_layout(shared, topology):
    """The shared entries of a run that places its experts (`model.moe_layer.MoELayer`'s placement), moved to the
    ranks of `topology` (a new world size): each layer's slot map stays (a slot is a row of the expert weights,
    hosted by rank slot // E_loc on any layout), its routers' locality masks are those of the new layout, and its
    window of kept choices per source rank starts again (the old ranks' rows are not the new ones')."""
    out = dict(shared)
    for name, value in shared.items():
        layer = name.rsplit(".moe.", 1)[0]
        if name.endswith(".moe.placement_window"):
            out[name] = np.zeros((topology.world_size, value.shape[1]), value.dtype)
        elif name.endswith(".moe.router.local_mask"):
            slots = tuple(int(s) for s in shared[layer + ".moe.expert_slot"])
            placed = dataclasses.replace(topology, expert_slots=slots)
            out[name] = placed.local_expert_mask().astype(value.dtype)
    return out


def reshard(path, out, ep=None, consolidate=False):
    """Convert checkpoint `path` to `ep` expert shards, or with `consolidate` to one bare file (the run's
    own layout, single-process), in run directory `out`.

    Returns: the written checkpoint path. Raises ConfigError / CheckpointError with one line.
    """
    run_config(path)  # one-line errors for a missing checkpoint or config
    source = RunConfig.from_yaml(checkpoint.config_of(path))
    experts_total = source.moe.num_experts
    if consolidate:
        nodes, devices = source.parallel.nodes, source.parallel.devices_per_node
    elif ep < 1 or experts_total % ep:
        raise ConfigError(f"--ep {ep}: must divide moe.num_experts = {experts_total}")
    else:
        nodes, devices = _layout(source, ep)
    shared, experts = read_all(path)
    for name, value in experts.items():
        if value.shape[0] != experts_total:
            raise checkpoint.CheckpointError(f"checkpoint {path}: {name} holds {value.shape[0]} experts, the config "
                                             f"has {experts_total}")
    dispatch = source.parallel.dispatch
    if (ep == 1 or consolidate) and dispatch in MULTI_PROCESS_BACKENDS:
        dispatch = "simulated"  # one process holds every expert
    overrides = [f"parallel.nodes={nodes}", f"parallel.devices_per_node={devices}", f"parallel.dispatch={dispatch}"]
    if (nodes, devices) != (source.parallel.nodes, source.parallel.devices_per_node):
        shared = _placement_for_layout(shared, Topology(nodes, devices, experts_total))
        if source.parallel.placement:  # the initial map, on the new ranks
            p = source.parallel
            first = slots_from_ranks(p.placement, p.nodes * p.devices_per_node)
            overrides.append(f"parallel.placement={expert_ranks(first, nodes * devices).tolist()}")
    cfg = RunConfig.from_dict(source.to_dict(), overrides)
    _prepare(out, path)
    cfg.save(os.path.join(out, "config.yaml"))
    file_format = cfg.runtime.checkpoint_format
    if consolidate:
        target = os.path.join(out, "model" + checkpoint.EXTENSIONS[file_format])
        checkpoint.write_arrays(target, {**shared, **experts}, {})
        return target
    from pangu_moe.train.trainer import config_fingerprint
    step = int(shared["step"])
    folder = checkpoint.step_path(out, step)
    shards = [list(range(r * experts_total // ep, (r + 1) * experts_total // ep)) for r in range(ep)]
    entries = [checkpoint.write_arrays(os.path.join(folder, checkpoint.shard_file(r, file_format)),
                                       {n: v[ids[0]:ids[-1] + 1] for n, v in experts.items()}, {})  # (E/W2, ...)
               for r, ids in enumerate(shards)]
    shared_entry = checkpoint.write_arrays(os.path.join(folder, checkpoint.shared_file(file_format)), shared, {})
    checkpoint.write_manifest(folder, step, config_fingerprint(cfg), shared_entry,
                              [{"rank": r, "experts": ids, **entry}
                               for r, (ids, entry) in enumerate(zip(shards, entries))])
    checkpoint.verify(folder)
    return folder


def _prepare(out, source):
    """Make the new run directory `out` for a checkpoint converted from checkpoint `source`, with the source
    run's tokenizer files (`data.source.RUN_FILES`) that it has."""
    if os.path.exists(os.path.join(out, "checkpoints")) or any(
            os.path.exists(os.path.join(out, "model" + ext)) for ext in checkpoint.EXTENSIONS.values()):
        raise ConfigError(f"--out {out}: already holds a checkpoint; choose a new folder")
    os.makedirs(out, exist_ok=True)
    for name in RUN_FILES:
        path = os.path.join(checkpoint.run_dir_of(source), name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out, name))


def extract_domain_run(path, domain, out):
    """Write the sub-model of `domain` (a data.domains name) of checkpoint `path` as run directory `out`.

    Returns: the written checkpoint folder.
    """
    cfg = run_config(path)
    if cfg.moe.num_groups == 1:
        raise ConfigError("ckpt extract-domain: the run has moe.num_groups = 1; every domain uses all experts, "
                          "there is no domain sub-model to cut out")
    if domain not in cfg.data.domains:
        raise ConfigError(f"--domain {domain!r}: must be one of {', '.join(cfg.data.domains)}")
    d = cfg.data.domains.index(domain)
    model, optimizer, state = restore(path, cfg)
    sub = extract_domain(model, d)
    moe = cfg.moe
    # the sub-model's experts are in expert order (`extract_domain`), so it starts with no placement
    sub_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(moe, num_experts=moe.num_experts // moe.num_groups,
                                                                num_groups=1),
                                  parallel=dataclasses.replace(cfg.parallel, placement=[], placement_every=0))
    sub_cfg = RunConfig.from_dict(sub_cfg.to_dict())  # validated: e.g. the topology must fit E_g experts
    t = cfg.train
    sub_optimizer = HybridEpsAdamW(sub.trainable_params(), t.beta1, t.beta2, t.eps, t.expert_eps, t.weight_decay)
    moments = in_expert_order({p.name: p.asnumpy() for p in optimizer.get_parameters()}, model)
    for p in sub_optimizer.get_parameters():
        name = p.name
        for prefix in MOMENT_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        p.set_data(Tensor(domain_slice(name, moments[p.name], d, moe.num_experts, moe.num_groups), p.dtype))
    _prepare(out, path)
    sub_cfg.save(os.path.join(out, "config.yaml"))
    from pangu_moe.train.trainer import config_fingerprint
    folder = checkpoint.step_path(out, int(state["step"]))
    checkpoint.save(folder, [sub, sub_optimizer], state, config_fingerprint(sub_cfg),
                    file_format=sub_cfg.runtime.checkpoint_format)
    return folder

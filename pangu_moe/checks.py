"""The rules a run's config must also meet that live with the code above the config: each router's own
rules (`routing.base.Router.check`), where MindSpore's shipped MoE ops can run (`ops.shipped.unfit`) and what
an expert placement map must be (`dispatch.placement.slots_from_ranks`).

The config (`pangu_moe/config.py`) is plain data at the ground floor: it checks its fields and their
cross-section rules and imports nothing of the project above it. Routers and kernel ops import the config's
types; this module imports both and is called where a config becomes a run (`Trainer`, `build_model`, the
CLI, the study presets), so no path trains on a config these rules refuse.
"""
import numpy as np

from pangu_moe.config import ConfigError
from pangu_moe.dispatch.placement import slots_from_ranks
from pangu_moe.ops.shipped import unfit
from pangu_moe.routing.registry import router_class


def check(cfg):
    """Raise `ConfigError` (one line) if `cfg` (a validated `config.RunConfig`) breaks a router's or the kernels'
    rules; returns `cfg`."""
    if cfg.runtime.kernels == "ascend_builtin":
        reason = unfit(cfg)
        if reason is not None:
            raise ConfigError(f"runtime.kernels = {cfg.runtime.kernels!r}: must be reference, custom or auto with "
                              f"{reason}")
    router_class(cfg.moe.router).check(cfg)
    initial_slots(cfg)
    return cfg


def initial_slots(cfg):
    """The slot map a run starts from (`dispatch.placement`): int64 [E] from parallel.placement, the identity
    when only parallel.placement_every is set, None when the run places no experts. Raises `ConfigError`
    (one line) for a map that is not E ranks with E / W experts each."""
    p = cfg.parallel
    if not p.placement:
        return None if p.placement_every == 0 else np.arange(cfg.moe.num_experts)
    if len(p.placement) != cfg.moe.num_experts:
        raise ConfigError(f"parallel.placement = {p.placement}: must list {cfg.moe.num_experts} ranks, one per "
                          f"expert (moe.num_experts)")
    try:
        return slots_from_ranks(p.placement, p.nodes * p.devices_per_node)
    except ValueError as e:
        raise ConfigError(f"parallel.{e}") from None

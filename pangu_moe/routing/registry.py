"""Routers by name: `moe.router` picks a registered class (`routing.base.register`), `moe.<router>` holds its
own settings. Importing this module registers the built-in routers; a router defined elsewhere registers
itself when its module is imported."""
from pangu_moe.config import ConfigError
# Registration order is the order `moe.router` errors and docs list the routers in.
from pangu_moe.routing import (topk, rre, locmoe, locmoe_plus, expert_choice, sinkhorn, deepseek,  # noqa: F401
                               balanced, kool_skip)
from pangu_moe.routing.base import ROUTERS


def router_class(name):
    """The Router class registered as `name`; `ConfigError` naming the registered ones otherwise."""
    if name not in ROUTERS:
        raise ConfigError(f"moe.router = {name!r}: must be one of {', '.join(ROUTERS)}")
    return ROUTERS[name]


def build_router(model_cfg, moe_cfg, layer, topology):
    """The level-2 router of MoE layer `layer` (0-based; seeds per-layer tables).

    Args:
        model_cfg: `config.ModelConfig`; moe_cfg: `config.MoEConfig`;
        topology: `dispatch.topology.Topology`, read by locality-aware routers.
    Returns:
        a `routing.base.Router`.
    """
    return router_class(moe_cfg.router).from_config(model_cfg, moe_cfg, layer, topology)

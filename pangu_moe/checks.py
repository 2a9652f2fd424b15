"""The rules a run's config must also meet that live with the code above the config: each router's own
rules (`routing.base.Router.check`) and where MindSpore's shipped MoE ops can run (`ops.shipped.unfit`).

The config (`pangu_moe/config.py`) is plain data at the ground floor: it checks its fields and their
cross-section rules and imports nothing of the project above it. Routers and kernel ops import the config's
types; this module imports both and is called where a config becomes a run (`Trainer`, `build_model`, the
CLI, the study presets), so no path trains on a config these rules refuse.
"""
from pangu_moe.config import ConfigError
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
    return cfg

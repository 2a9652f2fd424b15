"""`pangu-moe capacity`: LocMoE's capacity lower bound (Theorem 1) in its three forms.

For given (d, n, delta), or for a run's measured delta-hat per MoE layer: runs trained with
`moe.capacity_mode: locmoe_bound` record it in summary.json (`delta_hat`, one per layer), and their
config gives d = model.hidden and n = experts per group (the experts a token chooses among).
"""
import json
import os

from pangu_moe.capacity import LOWER_BOUND_FORMS, capacity_lower_bound
from pangu_moe.config import ConfigError, RunConfig


def bounds(deltas, hidden, num_experts):
    """One row per delta: {"delta", "exact", "erfc", "exp"} (floats, ec_min not rounded)."""
    if hidden < 2 or num_experts < 1:
        raise ConfigError(f"--d = {hidden} and --n = {num_experts}: need d >= 2 and n >= 1")
    rows = []
    for delta in deltas:
        if not 0.0 <= delta < 1.0:
            raise ConfigError(f"--delta = {delta}: must be in [0, 1)")
        rows.append({"delta": delta, **{form: capacity_lower_bound(delta, hidden, num_experts, form)
                                        for form in LOWER_BOUND_FORMS}})
    return rows


def from_run(run_dir):
    """(hidden d, experts per group n, [delta-hat per layer]) of a run directory."""
    summary_path, config_path = os.path.join(run_dir, "summary.json"), os.path.join(run_dir, "config.yaml")
    for path in (summary_path, config_path):
        if not os.path.isfile(path):
            raise ConfigError(f"--run {run_dir}: {os.path.basename(path)} not found (a finished run's "
                              f"directory holds config.yaml and summary.json)")
    with open(summary_path) as fh:
        summary = json.load(fh)
    if "delta_hat" not in summary:
        raise ConfigError(f"--run {run_dir}: summary.json has no delta_hat; only runs with "
                          f"moe.capacity_mode=locmoe_bound measure it (or pass --delta)")
    cfg = RunConfig.from_yaml(config_path)
    return cfg.model.hidden, cfg.moe.num_experts // cfg.moe.num_groups, [float(d) for d in summary["delta_hat"]]


def table(rows, hidden, num_experts, layers=False):
    """Human-readable lines; `layers`: the rows are a run's MoE layers in order."""
    lines = [f"LocMoE capacity lower bound ec_min (Theorem 1), d = {hidden}, n = {num_experts}:",
             f"  {'layer  ' if layers else ''}{'delta':>8s} {'exact':>12s} {'erfc':>12s} {'exp':>12s}"]
    for i, r in enumerate(rows):
        lines.append(f"  {f'{i:<5d}  ' if layers else ''}{r['delta']:8.4f} {r['exact']:12.4g} {r['erfc']:12.4g} "
                     f"{r['exp']:12.4g}")
    lines.append("  exact: 1 / (n (1 - I_{delta^2}(1/2, (d-1)/2)));  erfc: 1 / (n erfc(z));  exp: exp(z^2) / n, "
                 "z^2 = delta^2 d / (2 - delta^2)")
    return "\n".join(lines)

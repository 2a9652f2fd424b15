"""The router study: the demo model trained with the same data and steps under each router.

Setting (our choices, printed with the results):
- the demo config (`configs/demo_cpu.yaml`) with one expert group (G = 1: the routers choose among all
  E = 8 experts, as in the LocMoE paper's HashMoE / SwitchMoE / LocMoE comparison);
- a 2-node x 2-device topology, 2 experts per device, on the local backend: the ranks are virtual,
  the traffic is counted exactly (`accounting.traffic`);
- `data.mixture=by_node`: node n's ranks train on domain n (prose on node 0, code on node 1). With
  every rank holding the same mix no router sharing its weights across ranks could prefer a rank's
  local experts; with domains placed by node, locality is learnable from the token's content;
- each arm is named by its router: topk (K = 1: Switch), rre with one group (HashMoE), locmoe (capacity from the
  capacity factor, like the others, so that the comparison isolates routing), locmoe_plus (live
  capacity re-estimated every 50 steps, its ceiling the capacity-factor capacity); both LocMoE routers
  with locality weight mu = 0.1 (the paper gives none; at 0.01 the loss moved little in a few hundred
  steps); LocMoE+ with its Corollary 6 re-estimate (`capacity.false_positive_rates`, default settings) and
  the hybrid keep rule switching from TCR to ECR at step 100 (half of the default steps; `--steps` does not
  move it);
- validation at the end only; the load statistics cover the final 20% of the steps.
"""
import json
import os
import sys

from pangu_moe import report
from pangu_moe.config import ConfigError, RunConfig
from pangu_moe.report.runs import load_run

ROUTERS = {"topk": ["moe.router=topk"], "rre": ["moe.router=rre"],
           "locmoe": ["moe.router=locmoe", "moe.locmoe.locality_coeff=0.1"],
           "locmoe_plus": ["moe.router=locmoe_plus", "moe.locmoe_plus.locality_coeff=0.1",
                           "moe.locmoe_plus.switch_ratio=0",
                           "moe.locmoe_plus.switch_step=100"]}
SETTING = ["moe.num_groups=1", "parallel.nodes=2", "parallel.devices_per_node=2", "data.mixture=by_node"]
FIELDS = ("val_bpb", "max_over_mean_load", "dead_experts", "inter_node_fraction", "capacity_ratio",
          "dropped_fraction", "tokens_per_s")


def study_configs(config_path, steps, overrides=()):
    """{router name: RunConfig} for the study (validated; see the module docstring)."""
    schedule = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
                f"train.warmup_steps={min(30, steps)}"]
    return {name: RunConfig.from_yaml(config_path, [*SETTING, *schedule, *extra, *overrides])
            for name, extra in ROUTERS.items()}


def run(config_path, steps, out, overrides=(), log=None, routers=None):
    """Train every router (or those named in `routers`) into OUT/<name>, then write OUT/study.json and the
    report of the runs (`pangu_moe.report`: OUT/report/report.md and its figures); returns
    {name: {field: value}} with `FIELDS`."""
    from pangu_moe.train.trainer import Trainer, check_run_dir
    log = log or (lambda line: print(line, file=sys.stderr))
    unknown = sorted(set(routers or ()) - set(ROUTERS))
    if unknown:
        raise ConfigError(f"--routers: {unknown[0]!r} is not a study router; choose from {', '.join(ROUTERS)}")
    configs = {name: cfg for name, cfg in study_configs(config_path, steps, overrides).items()
               if not routers or name in routers}
    for name, cfg in configs.items():
        check_run_dir(cfg, os.path.join(out, name), False)  # refuse to mix with an earlier study up front
    results = {}
    for name, cfg in configs.items():
        log(f"== {name}")
        summary = Trainer(cfg, os.path.join(out, name), log).train()
        results[name] = {field: summary[field] for field in FIELDS}
    with open(os.path.join(out, "study.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    report.write([load_run(name, os.path.join(out, name)) for name in configs], os.path.join(out, "report"), log)
    return results


def table(results):
    """A human table, one row per router, and the acceptance ratios against topk (Switch)."""
    lines = [f"{'router':12s} {'val_bpb':>8s} {'max/mean':>9s} {'dead':>5s} {'inter':>7s} {'cap_ratio':>9s} "
             f"{'dropped':>8s} {'tok/s':>8s}"]
    for name, r in results.items():
        lines.append(f"{name:12s} {r['val_bpb']:8.3f} {r['max_over_mean_load']:9.2f} {r['dead_experts']:5d} "
                     f"{r['inter_node_fraction']:7.3f} {r['capacity_ratio']:9.3f} {r['dropped_fraction']:8.2%} "
                     f"{r['tokens_per_s']:8.0f}")
    base = results.get("topk")
    if base:
        for name in ("locmoe", "locmoe_plus"):
            if name in results:
                r = results[name]
                inter = r["inter_node_fraction"] / base["inter_node_fraction"] if base["inter_node_fraction"] else 0.0
                lines.append(f"{name} vs topk: inter-node x{inter:.2f}, val_bpb "
                             f"{r['val_bpb'] / base['val_bpb'] - 1:+.2%}, capacity ratio {r['capacity_ratio']:.2f}")
    return "\n".join(lines)

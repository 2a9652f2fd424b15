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

Cost figures per router (`cost_figures`), over the logged steps, each at the capacity bucket the step
trained with (`capacity_bucket` in metrics.jsonl): `layer_ms`, the forward + backward time of all MoE layers
(measured after training on the trained layers, `bench.moe_layer.moe_layers_seconds`, one measurement per
bucket); `step_ms`, the whole training step (from tokens_per_s); `expert_rows_per_step`, the buffer rows the
experts multiply (L x W x E x C: empty slots cost a row); `exchange_bytes_per_step`, what a padded
all-to-all of those buffers moves between the W ranks, there and back (2 x L x (W - 1) x E x C x H values
of `precision.BYTES` bytes each: 4 in fp32); `capacity_ratio`, the mean capacity in force over the factor-1.1 capacity.
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
COST_FIELDS = ("layer_ms", "step_ms", "expert_rows_per_step", "exchange_bytes_per_step")
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
        trainer = Trainer(cfg, os.path.join(out, name), log)
        summary = trainer.train()
        results[name] = {**{field: summary[field] for field in FIELDS}, **cost_figures(trainer, summary)}
    with open(os.path.join(out, "study.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    report.write([load_run(name, os.path.join(out, name)) for name in configs], os.path.join(out, "report"), log)
    return results


def cost_figures(trainer, summary, repeats=5):
    """`COST_FIELDS` of a trained run (see the module docstring)."""
    from mindspore import Tensor
    from pangu_moe.bench.moe_layer import moe_layers_seconds
    from pangu_moe.precision import BYTES
    from pangu_moe.train.metrics import read
    cfg = trainer.cfg
    buckets = [r["capacity_bucket"] for r in read(os.path.join(trainer.run_dir, "metrics.jsonl"))
               if "capacity_bucket" in r]
    input_ids, _, domain_ids = next(trainer.batches(0))
    inputs = trainer.model.moe_inputs(Tensor(input_ids), Tensor(domain_ids), trainer.capacity)
    seconds = {c: moe_layers_seconds(trainer.model, inputs, c, repeats) for c in sorted(set(buckets))}
    layers, world, experts = cfg.model.num_moe_layers, trainer.topology.world_size, cfg.moe.num_experts
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    mean = sum(buckets) / len(buckets)
    return {"layer_ms": 1e3 * sum(seconds[c] for c in buckets) / len(buckets),
            "step_ms": 1e3 * tokens_per_step / summary["tokens_per_s"] if summary["tokens_per_s"] else 0.0,
            "expert_rows_per_step": layers * world * experts * mean,
            "exchange_bytes_per_step": 2 * layers * (world - 1) * experts * mean * cfg.model.hidden
                                       * BYTES[cfg.train.precision]}


def table(results):
    """A human table, one row per router, and the acceptance ratios against topk (Switch)."""
    lines = [f"{'router':12s} {'val_bpb':>8s} {'max/mean':>9s} {'dead':>5s} {'inter':>7s} {'cap_ratio':>9s} "
             f"{'dropped':>8s} {'tok/s':>8s} {'layer_ms':>9s} {'step_ms':>8s} {'rows/step':>10s} {'MB/step':>8s}"]
    for name, r in results.items():
        lines.append(f"{name:12s} {r['val_bpb']:8.3f} {r['max_over_mean_load']:9.2f} {r['dead_experts']:5d} "
                     f"{r['inter_node_fraction']:7.3f} {r['capacity_ratio']:9.3f} {r['dropped_fraction']:8.2%} "
                     f"{r['tokens_per_s']:8.0f} {r['layer_ms']:9.1f} {r['step_ms']:8.1f} "
                     f"{r['expert_rows_per_step']:10.0f} {r['exchange_bytes_per_step'] / 1e6:8.2f}")
    base = results.get("topk")
    if base:
        for name in ("locmoe", "locmoe_plus"):
            if name in results:
                r = results[name]
                inter = r["inter_node_fraction"] / base["inter_node_fraction"] if base["inter_node_fraction"] else 0.0
                lines.append(f"{name} vs topk: inter-node x{inter:.2f}, val_bpb "
                             f"{r['val_bpb'] / base['val_bpb'] - 1:+.2%}, capacity ratio {r['capacity_ratio']:.2f}, "
                             f"layer time x{r['layer_ms'] / base['layer_ms']:.2f}, exchange bytes "
                             f"x{r['exchange_bytes_per_step'] / base['exchange_bytes_per_step']:.2f}")
    return "\n".join(lines)

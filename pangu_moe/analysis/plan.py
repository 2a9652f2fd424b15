"""`pangu-moe plan`: estimated exchange time per router at cluster scale, from runs' measured routing.

Reads each run directory (a study's OUT/<router> folders, or single runs): its summary.json
(inter_node_fraction, tokens_local/intra/inter, steps) and config.yaml (nodes, devices, layers, H).
Locality is carried over as `accounting.cost.locality_preference`; tokens per device and H default to
the run's own, and can be set to a target model's (`--tokens`, `--hidden`).
"""
import json
import os

from pangu_moe.config import ConfigError, RunConfig
from pangu_moe.accounting.cost import PRESETS, LayoutError, exchange_seconds, locality_preference
from pangu_moe.report.runs import SUMMARY, find_runs

DEVICES = (64, 128, 256)


def run_profile(run_dir):
    """(lambda, kept choices per device per layer and step, H) measured in one run."""
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    cfg = RunConfig.from_yaml(os.path.join(run_dir, "config.yaml"))
    nodes, world = cfg.parallel.nodes, cfg.parallel.nodes * cfg.parallel.devices_per_node
    if nodes < 2:
        raise ConfigError(f"plan: {run_dir} ran on parallel.nodes = {nodes}; its routing says nothing about "
                          f"locality (need >= 2 nodes)")
    kept = summary["tokens_local"] + summary["tokens_intra"] + summary["tokens_inter"]
    tokens = kept / (summary["steps"] * cfg.model.num_moe_layers * world)
    return locality_preference(summary["inter_node_fraction"], nodes), tokens, cfg.model.hidden


def run(paths, cluster="atlas800", devices=DEVICES, tokens=None, hidden=None, bytes_per_value=2, hierarchical=False,
        experts=None, tensor_parallel=1):
    """Returns {"cluster": ..., "rows": [{router, devices, ms, inter_fraction}], "impossible": [{devices, why}],
    "reductions": {...}, "own_scale": [{router, modelled_step_s, modelled_exchange_s_per_step}]} (own_scale: each
    run's measured step time plus its modelled exchange on its own links, from its summary, where it has them).
    `experts` E (default: a multiple of every device count) and `tensor_parallel` mp (the
    group-wise exchange) shape the layout; a device count whose layout cannot be built is listed under
    "impossible" instead of being modelled."""
    if cluster not in PRESETS:
        raise ConfigError(f"plan: --cluster {cluster!r}: must be one of {', '.join(PRESETS)}")
    spec = PRESETS[cluster]
    rows, impossible, own_scale = [], {}, []
    for name, run_dir in find_runs(paths, SUMMARY, "plan").items():
        preference, measured_tokens, measured_hidden = run_profile(run_dir)
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
        if "modelled_step_s" in summary:  # runs before the modelled exchange time have none
            own_scale.append({"router": name, "modelled_step_s": summary["modelled_step_s"],
                              "modelled_exchange_s_per_step": summary["modelled_exchange_s_per_step"]})
        for w in devices:
            try:
                est = exchange_seconds(tokens or measured_tokens, hidden or measured_hidden, bytes_per_value,
                                       preference, spec, w, hierarchical, experts, tensor_parallel)
            except LayoutError as e:
                impossible[w] = str(e)
                continue
            rows.append({"router": name, "devices": w, "ms": est["seconds"] * 1e3,
                         "inter_fraction": est["inter_fraction"], "locality_preference": preference})
    times = {(r["router"], r["devices"]): r["ms"] for r in rows}
    reductions = {f"{a}_vs_{b}@{w}": 1.0 - times[(a, w)] / times[(b, w)]
                  for a in ("locmoe", "locmoe_plus") for b in ("topk", "rre") for w in devices
                  if (a, w) in times and (b, w) in times}
    return {"cluster": spec.name, "assumptions": spec.source, "experts": experts, "tensor_parallel": tensor_parallel,
            "rows": rows, "impossible": [{"devices": w, "why": why} for w, why in sorted(impossible.items())],
            "reductions": reductions, "own_scale": own_scale}


def table(result):
    lines = [f"cluster {result['cluster']} ({result['assumptions']})",
             f"{'router':12s} {'devices':>7s} {'ms/layer':>9s} {'inter':>6s}"]
    lines += [f"{r['router']:12s} {r['devices']:7d} {r['ms']:9.3f} {r['inter_fraction']:6.3f}" for r in result["rows"]]
    lines += [f"{key}: exchange time {-value:+.1%}" for key, value in result["reductions"].items()]
    lines += [f"{r['devices']} devices: {r['why']}" for r in result["impossible"]]
    lines += [f"{r['router']} at its own scale: step {r['modelled_step_s']:.3f} s = measured compute + "
              f"{r['modelled_exchange_s_per_step'] * 1e3:.3f} ms of exchange on the run's links (modelled)"
              for r in result["own_scale"]]
    return "\n".join(lines)

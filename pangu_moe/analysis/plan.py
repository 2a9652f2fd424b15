"""`pangu-moe plan`: estimated exchange time per router at cluster scale, from runs' measured routing.

Reads each run directory (a study's OUT/<router> folders, or single runs): its summary.json
(inter_node_fraction, tokens_local/intra/inter, steps) and config.yaml (nodes, devices, layers, H).
Locality is carried over as `accounting.cost.locality_preference`; tokens per device and H default to
the run's own, and can be set to a target model's (`--tokens`, `--hidden`). A run that re-placed its experts
also gets the break-even step count of its moves on its own links (`placement_payback`, modelled).
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


def placement_payback(run_dir, late=0.2):
    """For a run that re-placed its experts (metrics `placements`, docs/outputs.md), on its own links (all
    modelled, `accounting.cost.modelled_exchange_seconds`): the seconds its moves took, the exchange seconds a
    step its placement saved over the last `late` share of its logged steps (each step's demand per (rank,
    expert) on the map it ran on, against the same demand on the contiguous map) and the break-even steps
    (move seconds / saving a step; None when nothing was saved). None for a run that never placed or has no
    metrics.jsonl.

    Returns {"move_s", "saved_s_per_step", "break_even_steps"} or None.
    """
    import math

    from pangu_moe.accounting.cost import Links, modelled_exchange_seconds
    from pangu_moe.dispatch.placement import placed
    from pangu_moe.dispatch.topology import Topology
    from pangu_moe.precision import BYTES
    from pangu_moe.report.runs import map_in_force, read_records
    path = os.path.join(run_dir, "metrics.jsonl")
    records = read_records(path) if os.path.exists(path) else []
    events = [e for r in records for e in r.get("placements", ())]
    if not events:
        return None
    cfg = RunConfig.from_yaml(os.path.join(run_dir, "config.yaml"))
    p = cfg.parallel
    links = Links.from_config(p)
    contiguous = Topology(p.nodes, p.devices_per_node, cfg.moe.num_experts)
    train = [r for r in records if r.get("layers")]
    saved = []
    for record in train[-max(1, math.ceil(late * len(train))):]:
        start = [p.placement or None] * len(record["layers"])  # parallel.placement, before the first event
        ranks = map_in_force(records, record["step"]) or start
        step = 0.0
        for layer, layer_ranks in zip(record["layers"], ranks):
            moved = contiguous if layer_ranks is None else placed(contiguous, layer_ranks)
            step += sum(sign * modelled_exchange_seconds(
                layer["tokens_per_rank_expert"], layer["capacity"], topology, cfg.model.hidden,
                BYTES[cfg.train.precision], links, p.exchange_layout, p.exchange == "hierarchical")
                for sign, topology in ((1, contiguous), (-1, moved)))
        saved.append(step)
    move = sum(e["move_bytes_intra"] / (links.intra_gbps * 1e9) + e["move_bytes_inter"] / (links.inter_gbps * 1e9)
               for e in events)
    per_step = sum(saved) / len(saved)
    return {"move_s": move, "saved_s_per_step": per_step,
            "break_even_steps": move / per_step if per_step > 0 else None}


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
            payback = placement_payback(run_dir)
            if payback is not None:
                own_scale[-1]["placement"] = payback
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
    lines += [f"{r['router']}: its expert moves took {r['placement']['move_s'] * 1e3:.3f} ms and saved "
              f"{r['placement']['saved_s_per_step'] * 1e3:.4f} ms of exchange a step late in the run: break-even "
              + (f"after {r['placement']['break_even_steps']:.0f} steps" if r['placement']['break_even_steps']
                 is not None else "never") + " (modelled)"
              for r in result["own_scale"] if "placement" in r]
    return "\n".join(lines)

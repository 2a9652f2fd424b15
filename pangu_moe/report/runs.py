"""Reading run directories and turning metrics.jsonl into per-step series.

Every series is a pure function of the records, so a test can recompute it by hand. Token counts are
the exact ones of `accounting.traffic.layer_record`: per layer and logged step, `tokens_per_expert`
is the demand (requested choices before dropping, summed over ranks) and `dropped` = demand - kept.
"""
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from pangu_moe.config import ConfigError, RunConfig
from pangu_moe.data.source import TOKENIZER_RECORD
from pangu_moe.dispatch.topology import Topology

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def find_runs(paths, marker, command):
    """{name: run dir} for run dirs or folders of run dirs (a study's OUT), in the order given.

    Args:
        paths: list of folders; marker: the file that makes a folder a run (e.g. "summary.json");
        command: the command's name, for the error message.
    Raises:
        ConfigError naming the path when neither it nor a sub-folder holds `marker`.
    """
    runs = {}
    for path in paths:
        if os.path.isfile(os.path.join(path, marker)):
            runs[os.path.basename(os.path.normpath(path))] = path
            continue
        found = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, marker))) \
            if os.path.isdir(path) else []
        if not found:
            raise ConfigError(f"{command}: {path}: no {marker} in it or in its sub-folders (pass a run or study dir)")
        runs.update({d: os.path.join(path, d) for d in found})
    return runs


@dataclass
class Run:
    """One run directory as the report reads it.

    Attributes:
        name: the folder's name; path: the folder.
        config: its resolved `RunConfig` (config.yaml), or None if absent.
        records: metrics.jsonl records in file order (dicts with "step", "loss", "layers", ...).
        summary: summary.json as a dict, or None for a run that has not finished.
        trace: trace.json written by `pangu-moe generate --trace`, or None.
        tokenizer: "bytes" or "bpe" (the run's tokenizer record, else its config), None when neither tells.
    """
    name: str
    path: str
    config: Optional[RunConfig]
    records: List[dict]
    summary: Optional[dict]
    trace: Optional[dict]
    tokenizer: Optional[str] = None


def token_unit(runs):
    """"byte" when every run of `runs` trains on the byte tokenizer (a token is a byte, so the LM loss per token
    is per byte too), else "token": the training loss is always per token, and a BPE token spans several bytes."""
    return "byte" if runs and all(run.tokenizer == "bytes" for run in runs) else "token"


def _tokenizer_kind(path, config):
    record = os.path.join(path, TOKENIZER_RECORD)
    if os.path.isfile(record):
        return _read_json(record, TOKENIZER_RECORD).get("kind")
    if config is None or config.data.source == "prepared":  # a prepared corpus names its tokenizer, not the config
        return None
    return "bytes" if config.data.tokenizer == "bytes" else "bpe"


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"report: {path}: not a valid {what} ({e})") from None


def read_records(path):
    """The records of a metrics.jsonl; a malformed line is an error naming the file and line."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ConfigError(f"report: {path}:{number}: not a JSON line (a run killed while writing leaves "
                                  f"at most its last line partial; delete that line)") from None
            if not isinstance(record, dict) or "step" not in record or "loss" not in record:
                raise ConfigError(f"report: {path}:{number}: a metrics record needs 'step' and 'loss'")
            records.append(record)
    if not records:
        raise ConfigError(f"report: {path}: no records (the run has not logged a step yet)")
    return records


def load_run(name, path):
    """A `Run` from its folder (metrics.jsonl required; config.yaml, summary.json, trace.json optional)."""
    config_path = os.path.join(path, "config.yaml")
    summary_path = os.path.join(path, SUMMARY)
    trace_path = os.path.join(path, "trace.json")
    config = RunConfig.from_yaml(config_path) if os.path.isfile(config_path) else None
    return Run(name, path, config, read_records(os.path.join(path, METRICS)),
               _read_json(summary_path, SUMMARY) if os.path.isfile(summary_path) else None,
               _read_json(trace_path, "trace") if os.path.isfile(trace_path) else None,
               _tokenizer_kind(path, config))


def load_runs(paths):
    """[Run] for run dirs or study folders (see `find_runs`)."""
    return [load_run(name, path) for name, path in find_runs(paths, METRICS, "report").items()]


def curve(records, key):
    """(steps int [n], values float [n]) over the records that carry `key` (val_bpb: evaluation steps)."""
    chosen = [r for r in records if key in r]
    return np.array([r["step"] for r in chosen], np.int64), np.array([r[key] for r in chosen], np.float64)


def _layered(records):
    return [r for r in records if r.get("layers")]


def layer_steps(records):
    """int [n]: the steps of the records that carry per-layer routing counts."""
    return np.array([r["step"] for r in _layered(records)], np.int64)


def layer_counts(records):
    """Token counts per logged step, summed over the MoE layers: {"requested", "dropped", "inter", "kept"},
    each float [n] (kept = local + intra-node + inter-node kept choices)."""
    layered = _layered(records)

    def total(count):
        return np.array([sum(count(layer) for layer in r["layers"]) for r in layered], np.float64)

    return {"requested": total(lambda layer: sum(layer["tokens_per_expert"])),
            "dropped": total(lambda layer: layer["dropped"]),
            "inter": total(lambda layer: layer["tokens_inter"]),
            "kept": total(lambda layer: layer["tokens_local"] + layer["tokens_intra"] + layer["tokens_inter"])}


def _ratio(numerator, denominator):
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def dropped_fraction(records):
    """float [n]: dropped choices / requested choices, over all MoE layers of each logged step."""
    counts = layer_counts(records)
    return _ratio(counts["dropped"], counts["requested"])


def inter_node_fraction(records):
    """float [n]: kept choices whose expert is on another node / all kept choices, over all MoE layers."""
    counts = layer_counts(records)
    return _ratio(counts["inter"], counts["kept"])


def capacities(records):
    """int [n, L]: each MoE layer's capacity C (slots per expert per rank group) at each logged step."""
    return np.array([[layer["capacity"] for layer in r["layers"]] for r in _layered(records)], np.int64)


def expert_load(records, layer):
    """float [n, E]: one layer's demand per expert over the mean demand of that step (1 = fair share)."""
    demand = np.array([r["layers"][layer]["tokens_per_expert"] for r in _layered(records)], np.float64)  # (n, E)
    mean = demand.mean(1, keepdims=True)
    return np.divide(demand, mean, out=np.zeros_like(demand), where=mean > 0)


def num_moe_layers(records):
    layered = _layered(records)
    return len(layered[0]["layers"]) if layered else 0


def placement_series(records, first):
    """Where each expert lived over the run (`placements` events, docs/outputs.md): (steps int [n + 1]: 0 and
    each placement's step, ranks int [L, n + 1, E]: each MoE layer's expert -> rank map from that step on),
    starting from `first` (int [E], the map the run started from); None for a run that never placed."""
    events = sorted((e for r in records for e in r.get("placements", ())), key=lambda e: e["step"])
    if not events:
        return None
    layers = len(events[0]["expert_rank"])
    steps = np.array([0] + [e["step"] for e in events], np.int64)
    ranks = np.array([[list(first)] * layers] + [e["expert_rank"] for e in events], np.int64)  # (n + 1, L, E)
    return steps, ranks.transpose(1, 0, 2)


def map_in_force(records, step):
    """Each MoE layer's expert -> rank map that step `step` ran on: that of the latest `placements` event of an
    earlier step ([L] lists of E ranks), or None before the first (the run's starting map)."""
    events = [e for r in records for e in r.get("placements", ()) if e["step"] < step]
    return max(events, key=lambda e: e["step"])["expert_rank"] if events else None


def initial_ranks(run):
    """int [E]: the rank of each expert when `run` started (parallel.placement, else contiguous); the
    contiguous map of one rank when the run has no config."""
    experts = len(run.records[0]["layers"][0]["tokens_per_expert"]) if num_moe_layers(run.records) else 0
    if run.config is None:
        return [0] * experts
    p = run.config.parallel
    return list(p.placement) or Topology(p.nodes, p.devices_per_node, experts).expert_rank().tolist()


def final_expert_nodes(run, layer):
    """int [E]: the node of each expert of MoE layer `layer` after the run's last logged step (its last placement's
    map, else the map it started from); all 0 when the run has no config."""
    ranks = np.asarray(initial_ranks(run), np.int64)
    if run.config is None:
        return ranks
    last = map_in_force(run.records, run.records[-1]["step"] + 1)
    if last is not None:
        ranks = np.asarray(last[layer], np.int64)
    return ranks // run.config.parallel.devices_per_node

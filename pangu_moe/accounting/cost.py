"""A communication cost model for the expert-parallel exchange, fed by a run's measured routing.

We cannot time an Ascend cluster here, so `pangu-moe plan` estimates the all-to-all time per MoE
layer and step from (a) a cluster description and (b) how a router placed its tokens in a run.

Model (our assumptions, stated so they can be argued with):
- Every device holds `tokens` routed choices per layer and step and sends each kept choice's H-vector
  to the device of its expert and back (dispatch + combine), `bytes_per_value` per element.
- Locality is summarised by lambda, the router's preference for the token's own node beyond a uniform
  spread: P(expert on the token's node) = lambda + (1 - lambda) / N. It is measured from the run's
  inter-node fraction f at its N_run nodes, lambda = 1 - f / (1 - 1/N_run), and carried to the target
  cluster unchanged (a router that learned to keep 70% of its tokens home keeps doing so).
- Inside a node, choices spread uniformly over its D devices (1/D stay on the device).
- Links work in parallel; a device's exchange time is the larger of its intra-node and inter-node
  transfer times, plus one latency per message. A flat all-to-all sends one message to each of the
  W - 1 peers; a hierarchical one sends N - 1 inter-node messages (to its same-local-rank peers) and
  D - 1 intra-node ones, carrying the same bytes.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    """Per-device link figures: bandwidth in GB/s (one direction), latency in seconds."""
    name: str
    devices_per_node: int
    intra_bandwidth: float
    inter_bandwidth: float
    intra_latency: float
    inter_latency: float
    source: str


PRESETS = {
    "atlas800": Cluster(
        "atlas800", 8, intra_bandwidth=30.0, inter_bandwidth=12.5, intra_latency=5e-6, inter_latency=10e-6,
        source="assumed: 8 Ascend 910 NPUs per Atlas 800 server joined by HCCS (30 GB/s per device assumed); "
               "one 100 Gb/s RoCE port per NPU between servers (Atlas 300T/800 documentation: 100G "
               "Ethernet per training card), i.e. 12.5 GB/s; latencies are placeholders"),
}


def locality_preference(inter_fraction, nodes):
    """lambda in [0, 1] from a measured inter-node fraction at `nodes` nodes (1: all home, 0: uniform).

    A router measured slightly below uniform (noise, or the demand of one run) counts as uniform, so
    it is not extrapolated into sending everything away at large N.
    """
    if nodes < 2:
        raise ValueError(f"locality_preference: the run has {nodes} node(s); need at least 2 to measure locality")
    return min(1.0, max(0.0, 1.0 - inter_fraction / (1.0 - 1.0 / nodes)))


def exchange_seconds(tokens, hidden, bytes_per_value, preference, cluster, devices, hierarchical=False):
    """Estimated exchange time of one MoE layer on one device (dispatch + combine).

    Args:
        tokens: kept choices per device; hidden: H; bytes_per_value: 2 for fp16/bf16;
        preference: lambda (`locality_preference`); cluster: `Cluster`; devices: W (a multiple of D);
        hierarchical: message count of the two-stage exchange.
    Returns:
        dict: seconds, inter_fraction, intra_bytes, inter_bytes, messages (per direction).
    """
    d = cluster.devices_per_node
    if devices % d:
        raise ValueError(f"exchange_seconds: devices = {devices} must be a multiple of {d} per node")
    nodes = devices // d
    home = preference + (1.0 - preference) / nodes
    inter = 1.0 - home
    vector = hidden * bytes_per_value
    intra_bytes = 2 * tokens * home * (d - 1) / d * vector
    inter_bytes = 2 * tokens * inter * vector
    intra_messages = d - 1
    inter_messages = (nodes - 1) if hierarchical else devices - d
    seconds = max(intra_bytes / (cluster.intra_bandwidth * 1e9), inter_bytes / (cluster.inter_bandwidth * 1e9)) + \
        2 * (intra_messages * cluster.intra_latency + inter_messages * cluster.inter_latency)
    return {"seconds": seconds, "inter_fraction": inter, "intra_bytes": intra_bytes, "inter_bytes": inter_bytes,
            "messages": intra_messages + inter_messages}

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
- Experts (`expert_layout`, when E is given): E a multiple of W spreads E/W experts a device, as without
  E; W a multiple of E gives each expert W/E consecutive devices, which must tile the nodes (W/E divides D
  or D divides W/E). Then a node hosts max(1, E/N) experts, so a uniform choice stays home with chance
  max(1/N, 1/E): with E < N a node hosts one expert (spread over several nodes) and lambda is applied
  to 1/E. Inside a node, a choice whose expert is home stays on the device with chance 1/(experts a node)
  when E < W (the device hosts one of them), 1/D otherwise. Any other (E, W) is an impossible layout.
  With tensor parallelism the experts are spread over the W/mp ep ranks (D/mp a node) instead of W.
- Tensor parallelism mp (`tensor_parallel`, LocMoE's group-wise exchange, `dispatch/group_wise.py`): the
  mp devices of a tp group hold the same tokens and each sends 1/mp of them across the all-to-all, which
  runs among the W/mp devices at the same tp position (D/mp a node); the tp group then AllGathers inside
  the node what the others received: (mp - 1)/mp of the tokens, both directions. mp must divide D.
"""
from dataclasses import dataclass

import numpy as np


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


@dataclass(frozen=True)
class Links:
    """A simulated cluster's per-device links (`parallel.intra_node_gbps`, ...): one-direction bandwidth in GB/s
    (1e9 bytes) and latency in seconds, inside a node and across nodes."""
    intra_gbps: float
    inter_gbps: float
    intra_latency: float
    inter_latency: float

    @classmethod
    def from_config(cls, parallel):
        """From a `config.ParallelConfig` (latencies there in microseconds)."""
        return cls(parallel.intra_node_gbps, parallel.inter_node_gbps, parallel.intra_node_latency_us * 1e-6,
                   parallel.inter_node_latency_us * 1e-6)


def modelled_exchange_seconds(kept_per_expert, capacity, topology, hidden, bytes_per_value, links, layout="ragged",
                              hierarchical=False):
    """Modelled time of one MoE layer's exchange (dispatch and combine) from one step's measured routing.

    Each rank sends, both ways, what the exchange moves (`accounting.traffic.exchange_bytes`: the kept rows and
    each remote block's occupancy when ragged, every slot when padded); a rank's time is the larger of its
    intra-node and inter-node bytes over the tier's bandwidth (the links work in parallel) plus one latency per
    message; the layer waits for the slowest rank. Hierarchical: a rank's inter-node rows go once to its
    same-local-rank peer on each other node, which forwards them inside its node (extra intra-node bytes
    there); messages per collective are (N - 1) inter + (D - 1) intra, against (W - D) inter + (D - 1) intra
    flat. Collectives a layer: 2 padded (dispatch, combine), 3 ragged (occupancy first).

    Args: kept_per_expert [W, E] int; capacity C; topology; hidden H; bytes_per_value b; links: `Links`;
        layout: "ragged" or "padded"; hierarchical: bool.
    Returns: seconds (float, modelled).
    """
    from pangu_moe.accounting.traffic import block_slots, pair_rows, tier_masks
    w, d = topology.world_size, topology.devices_per_node
    tiers, block = tier_masks(topology), block_slots(capacity, topology)
    if layout == "ragged":
        rows = pair_rows(kept_per_expert, topology).astype(np.float64)
        vectors = rows + rows.T  # (r, q): rows r sends q in the dispatch and q's back to r in the combine
        control = block  # the occupancy of each remote block, dispatch only
    else:
        vectors = np.full((w, w), 2.0 * block)
        control = 0
    sent = {t: (vectors * m).sum(1) * hidden * bytes_per_value + m.sum(1) * control * bytes_per_value
            for t, m in tiers.items()}  # (W,) bytes a rank sends per tier
    if hierarchical and topology.nodes > 1 and d > 1:
        local = np.arange(w) % d
        node = np.arange(w) // d
        # rows for rank q arriving from other nodes land on q's node at the peer with the sender's local rank
        forwarded = np.zeros(w)
        for q in range(w):
            for s in np.nonzero(tiers["inter"][:, q])[0]:
                peer = node[q] * d + local[s]
                if peer != q:
                    forwarded[peer] += vectors[s, q] * hidden * bytes_per_value
        sent["intra"] = sent["intra"] + forwarded
        messages = {"intra": d - 1, "inter": topology.nodes - 1}
    else:
        messages = {"intra": d - 1, "inter": w - d}
    collectives = 3 if layout == "ragged" else 2
    transfer = np.maximum(sent["intra"] / (links.intra_gbps * 1e9), sent["inter"] / (links.inter_gbps * 1e9))
    latency = collectives * (messages["intra"] * links.intra_latency + messages["inter"] * links.inter_latency)
    return float(transfer.max() + latency)


def locality_preference(inter_fraction, nodes):
    """lambda in [0, 1] from a measured inter-node fraction at `nodes` nodes (1: all home, 0: uniform).

    A router measured slightly below uniform (noise, or the demand of one run) counts as uniform, so
    it is not extrapolated into sending everything away at large N.
    """
    if nodes < 2:
        raise ValueError(f"locality_preference: the run has {nodes} node(s); need at least 2 to measure locality")
    return min(1.0, max(0.0, 1.0 - inter_fraction / (1.0 - 1.0 / nodes)))


class LayoutError(ValueError):
    """An (experts, devices, tensor-parallel) layout that cannot be built; the message says why."""


def expert_layout(experts, devices, devices_per_node):
    """(share of a uniform choice whose expert is on the token's node, share of a home choice that stays on the
    device) for E = `experts` on W = `devices` (module doc). Raises LayoutError for layouts that cannot be built."""
    d = devices_per_node
    nodes = devices // d
    if experts is None or experts % devices == 0:
        return 1.0 / nodes, 1.0 / d
    if devices % experts:
        raise LayoutError(f"E = {experts} experts on W = {devices} devices: impossible, one must divide the other "
                          f"(each device hosts E/W experts, or each expert W/E devices)")
    span = devices // experts
    if span % d and d % span:
        raise LayoutError(f"E = {experts} experts on W = {devices} devices: impossible, an expert's {span} devices "
                          f"would straddle two nodes of {d}")
    per_node = max(1, experts // nodes)
    return max(1.0 / nodes, 1.0 / experts), 1.0 / per_node


def exchange_seconds(tokens, hidden, bytes_per_value, preference, cluster, devices, hierarchical=False, experts=None,
                     tensor_parallel=1):
    """Estimated exchange time of one MoE layer on one device (dispatch + combine).

    Args:
        tokens: kept choices per device; hidden: H; bytes_per_value: 2 for fp16/bf16;
        preference: lambda (`locality_preference`); cluster: `Cluster`; devices: W (a multiple of D);
        hierarchical: message count of the two-stage exchange; experts: E (None: a multiple of W);
        tensor_parallel: mp, the group-wise exchange's tp size (1: plain exchange).
    Returns:
        dict: seconds, inter_fraction, intra_bytes, inter_bytes, messages (per direction).
    Raises: ValueError if W is not a multiple of D; LayoutError for an impossible (E, W, mp).
    """
    d, mp = cluster.devices_per_node, tensor_parallel
    if devices % d:
        raise ValueError(f"exchange_seconds: devices = {devices} must be a multiple of {d} per node")
    if mp < 1 or d % mp:
        raise LayoutError(f"tensor parallelism {mp}: impossible, it must divide the {d} devices of a node")
    nodes = devices // d
    uniform_home, stay = expert_layout(experts, devices // mp, d // mp)  # experts live on the W/mp ep ranks
    home = preference + (1.0 - preference) * uniform_home
    inter = 1.0 - home
    vector = hidden * bytes_per_value
    intra_bytes = 2 * tokens * home * (1.0 - stay) * vector / mp + 2 * tokens * (mp - 1) / mp * vector
    inter_bytes = 2 * tokens * inter * vector / mp
    intra_messages = d // mp - 1 + (mp - 1)
    inter_messages = (nodes - 1) if hierarchical else (devices - d) // mp
    seconds = max(intra_bytes / (cluster.intra_bandwidth * 1e9), inter_bytes / (cluster.inter_bandwidth * 1e9)) + \
        2 * (intra_messages * cluster.intra_latency + inter_messages * cluster.inter_latency)
    return {"seconds": seconds, "inter_fraction": inter, "intra_bytes": intra_bytes, "inter_bytes": inter_bytes,
            "messages": intra_messages + inter_messages}

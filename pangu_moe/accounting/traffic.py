"""Exact routing accounting: where the kept tokens of each rank go, and how even the load is.

These are the counts a real cluster would move for the given placement, whatever backend ran the
step (on one device the ranks are virtual). Bytes count the dispatch and the combine exchange of
each token's hidden vector.
"""
import numpy as np

PLACES = ("local", "intra", "inter")


def route_classes(kept_per_expert, topology):
    """Kept choices by destination class.

    Args:
        kept_per_expert: int array [W, E], kept choices of rank r's tokens on expert e.
        topology: `dispatch.topology.Topology` with W ranks.
    Returns:
        dict {"local", "intra", "inter"} -> int token counts.
    """
    kept = np.asarray(kept_per_expert, np.int64)
    classes = topology.placement_classes()
    return {name: int(kept[classes == i].sum()) for i, name in enumerate(PLACES)}


def inter_node_messages(kept_per_expert, topology):
    """Messages crossing a node boundary in one direction of the exchange (dispatch; combine mirrors it).

    Flat all-to-all: one message per (source rank, destination rank on another node) pair that carries
    tokens. Hierarchical: the inter-node stage sends one message per (source rank, destination node)
    pair to the same-local-rank peer there, which forwards inside its node (`dispatch.exchange`). An
    expert spanning several ranks counts at its first rank.

    Args: kept_per_expert [W, E] int; topology: `Topology`.
    Returns: (flat, hierarchical) ints; hierarchical <= flat always.
    """
    kept = np.asarray(kept_per_expert, np.int64)
    w, d = topology.world_size, topology.devices_per_node
    to_rank = np.zeros((w, w), np.int64)
    np.add.at(to_rank.T, topology.expert_rank(), kept.T)  # (W dst, W src) += per expert
    node = np.arange(w) // d
    crossing = node[:, None] != node[None, :]  # (src, dst)
    flat = int(((to_rank > 0) & crossing).sum())
    to_node = np.zeros((w, topology.nodes), np.int64)
    np.add.at(to_node.T, node, to_rank.T)  # (N dst, W src)
    hierarchical = int(((to_node > 0) & (node[:, None] != np.arange(topology.nodes)[None, :])).sum())
    return flat, hierarchical


def pair_rows(kept_per_expert, topology):
    """Kept choices per (source rank, destination rank): int64 [W, W] from kept_per_expert [W, E] (an expert
    spanning several ranks counts at its first rank)."""
    kept = np.asarray(kept_per_expert, np.int64)
    w = topology.world_size
    rows = np.zeros((w, w), np.int64)
    np.add.at(rows.T, topology.expert_rank(), kept.T)
    return rows


def tier_masks(topology):
    """{"intra": bool [W, W] (another rank of the node), "inter": bool [W, W] (a rank of another node)}."""
    w = topology.world_size
    node = np.arange(w) // topology.devices_per_node
    return {"intra": (node[:, None] == node[None, :]) & ~np.eye(w, dtype=bool), "inter": node[:, None] != node[None, :]}


def block_slots(capacity, topology):
    """Slots S = E_loc * C of one (source, destination) block of the exchange."""
    return max(topology.num_experts // topology.world_size, 1) * int(capacity)


def exchange_bytes(kept_per_expert, capacity, topology, hidden, bytes_per_value, inter_rows=None):
    """Bytes one step of one layer's expert-parallel exchange sends between ranks, dispatch and combine.

    Ragged (`dispatch.ragged`, what the exchange sends on simulated, msrun_cpu and hccl): each kept choice's
    H-vector both ways, plus each remote block's occupancy (E_loc * C values, dispatch only). Padded
    (`dispatch.exchange.Exchange`): every slot of each remote block [E_loc, C, H], both ways, whatever was kept.
    Blocks between the ranks of one node count as intra-node, others as inter-node; a rank's own block
    does not leave it.

    With `inter_rows` (the hierarchical ragged exchange, N > 1 and D > 1) the ragged figures are that exchange's:
    inter-node, the dispatch's stage-1 rows as it counted them (one per (token, other node)), the combine's
    kept choices crossing nodes (not deduplicated) and each stage-1 message's slot map (D * S values to each other
    node, as many as the flat exchange's remote occupancies); intra-node, both ways, every kept choice whose
    source and destination differ in local rank (stage 2 forwards it inside a node: the destination's, or on
    the combine the source's), plus the stage-2 occupancies (N blocks of S to each other local rank).

    Args: kept_per_expert [W, E] int; capacity C; topology: `Topology` (E % W == 0 for the padded figures);
        hidden H; bytes_per_value b; inter_rows: None or int [W], rows each rank's stage-1 messages carried to
        other nodes.
    Returns: {"ragged": {"intra": int, "inter": int}, "padded": {"intra": int, "inter": int}}.
    """
    rows, tiers, block = pair_rows(kept_per_expert, topology), tier_masks(topology), block_slots(capacity, topology)
    padded = {t: int(2 * m.sum() * block * hidden * bytes_per_value) for t, m in tiers.items()}
    if inter_rows is None:
        return {"ragged": {t: int((2 * rows[m].sum() * hidden + m.sum() * block) * bytes_per_value)
                           for t, m in tiers.items()}, "padded": padded}
    w, d, nodes = topology.world_size, topology.devices_per_node, topology.nodes
    local = np.arange(w) % d
    forwarded = local[:, None] != local[None, :]  # (source, destination): stage 2 moves it inside a node
    inter = (int(np.sum(inter_rows)) + rows[tiers["inter"]].sum()) * hidden + tiers["inter"].sum() * block
    intra = 2 * rows[forwarded].sum() * hidden + w * (d - 1) * nodes * block
    return {"ragged": {"intra": int(intra * bytes_per_value), "inter": int(inter * bytes_per_value)},
            "padded": padded}


def load_stats(tokens_per_expert):
    """Load balance of one layer's demand.

    Args:
        tokens_per_expert: int array [E] (or [W, E], summed over ranks).
    Returns:
        dict with max_over_mean_load (max / mean demand; 1.0 is perfect balance) and dead_experts
        (experts with zero demand).
    """
    demand = np.asarray(tokens_per_expert, np.int64)
    demand = demand.sum(0) if demand.ndim == 2 else demand
    mean = demand.mean()
    return {"max_over_mean_load": float(demand.max() / mean) if mean else 0.0,
            "dead_experts": int((demand == 0).sum())}


def layer_record(tokens_per_expert, kept_per_expert, capacity, topology, hidden, bytes_per_value=4, slots=None,
                 inter_rows=None):
    """The per-layer metrics.jsonl record for one step (docs/outputs.md).

    Args:
        tokens_per_expert, kept_per_expert: int arrays [W, E]; capacity: C of the step;
        hidden: H; bytes_per_value: of the exchanged activations (4 for fp32); slots: the buffers' slots per expert
        (the step's capacity bucket, >= C; default C); inter_rows: the hierarchical ragged exchange's stage-1 rows
        to other nodes [W] (`exchange_bytes`), None for the flat exchange.
    Returns:
        dict: tokens_per_expert, kept_per_expert (summed over ranks), tokens_per_rank_expert [W][E] and
        kept_per_rank [W] (what capacity sees: it binds per rank), dropped, capacity, tokens_local/intra/inter,
        bytes_intra/inter (the ragged exchange's, `exchange_bytes`), padded_bytes_intra/inter (the padded
        exchange's), messages_inter_flat / _hierarchical (one direction), max_over_mean_load, dead_experts.
    """
    demand = np.asarray(tokens_per_expert, np.int64)
    kept = np.asarray(kept_per_expert, np.int64)
    places = route_classes(kept, topology)
    flat, hierarchical = inter_node_messages(kept, topology)
    moved = exchange_bytes(kept, capacity if slots is None else slots, topology, hidden, bytes_per_value, inter_rows)
    return {
        "tokens_per_expert": [int(v) for v in demand.sum(0)],
        "kept_per_expert": [int(v) for v in kept.sum(0)],
        "tokens_per_rank_expert": demand.tolist(), "kept_per_rank": [int(v) for v in kept.sum(1)],
        "dropped": int(demand.sum() - kept.sum()),
        "capacity": int(capacity),
        "tokens_local": places["local"], "tokens_intra": places["intra"], "tokens_inter": places["inter"],
        "bytes_intra": moved["ragged"]["intra"], "bytes_inter": moved["ragged"]["inter"],
        "padded_bytes_intra": moved["padded"]["intra"], "padded_bytes_inter": moved["padded"]["inter"],
        "messages_inter_flat": flat, "messages_inter_hierarchical": hierarchical,
        **load_stats(demand),
    }


def window_load_stats(records, last_step, window, dead_share=0.01):
    """Run-level load statistics over the metrics records of the final `window` share of the steps.

    Demand is summed over the window's logged steps, per layer. An expert is *dead* when it got less
    than `dead_share` of its fair share (total / E) in that window: a strict zero would hide experts
    that receive a handful of tokens out of thousands.

    Args:
        records: metrics.jsonl records (dicts with "step" and "layers").
        last_step: the run's final step; window: share of the steps (0, 1].
    Returns:
        dict: max_over_mean_load (mean over layers), dead_experts (sum over layers), and the per-layer
        lists max_over_mean_load_per_layer, dead_experts_per_layer.
    """
    first = last_step * (1.0 - window)
    chosen = [r["layers"] for r in records if "layers" in r and r["step"] > first]
    if not chosen:
        return {"max_over_mean_load": 0.0, "dead_experts": 0}
    demand = np.array([[layer["tokens_per_expert"] for layer in layers] for layers in chosen]).sum(0)  # (L, E)
    mean = demand.mean(1)
    ratio = [float(d.max() / m) if m else 0.0 for d, m in zip(demand, mean)]
    dead = [int((d < dead_share * m).sum()) for d, m in zip(demand, mean)]
    return {"max_over_mean_load": float(np.mean(ratio)), "dead_experts": int(sum(dead)),
            "max_over_mean_load_per_layer": ratio, "dead_experts_per_layer": dead}


def rank_balance(records, last_step, window, dead_share=0.01):
    """Load balance as capacity sees it: per rank, over the logged steps of the final `window` share of the run.

    Capacity binds per rank (each rank routes its own tokens into C slots an expert), so a balance summed over
    ranks hides a rank that drops what the others keep. For each rank r, summed over the window's logged
    steps: drop rate = 1 - kept / demand over every layer; max/mean load = max_e / mean_e of its demand per
    expert, averaged over layers; dead experts = experts given less than `dead_share` of its fair share
    (demand / E), summed over layers.

    Args: records: metrics.jsonl records with "layers" (`layer_record`); last_step: the run's final step;
        window: share of the steps (0, 1].
    Returns: {figure: {"worst_rank": float, "mean_over_ranks": float, "per_rank": [W floats]}} for the figures
        drop_rate, max_over_mean_load, dead_experts; {} if no record holds per-rank demand.
    """
    first = last_step * (1.0 - window)
    chosen = [r["layers"] for r in records if "layers" in r and r["step"] > first
              and "tokens_per_rank_expert" in r["layers"][0]]
    if not chosen:
        return {}
    demand = np.array([[layer["tokens_per_rank_expert"] for layer in layers] for layers in chosen]).sum(0)  # (L, W, E)
    kept = np.array([[layer["kept_per_rank"] for layer in layers] for layers in chosen]).sum(0)  # (L, W)
    wanted = demand.sum((0, 2))  # (W,)
    mean = demand.mean(2, keepdims=True)  # (L, W, 1)
    ratio = np.where(mean[..., 0] > 0, demand.max(2) / np.maximum(mean[..., 0], 1e-12), 0.0)  # (L, W)
    figures = {"drop_rate": np.where(wanted > 0, 1.0 - kept.sum(0) / np.maximum(wanted, 1), 0.0),
               "max_over_mean_load": ratio.mean(0),
               "dead_experts": (demand < dead_share * mean).sum((0, 2)).astype(np.float64)}
    return {name: {"worst_rank": float(v.max()), "mean_over_ranks": float(v.mean()), "per_rank": v.tolist()}
            for name, v in figures.items()}

"""Expert placement: which slot hosts each expert, and the placement that keeps most kept choices on their node.

A *slot* is a row of the expert weights and of every exchange buffer: slot s lives on rank s // E_loc (E_loc =
E / W experts a rank). Without a placement map expert e sits in slot e (`Topology`'s contiguous placement). With
one, `slots[e]` is expert e's slot; the router still routes, keeps and drops by expert id, and the layer maps each
kept choice to its expert's slot before dispatch (`model.moe_layer.MoELayer`), so a placement changes which rank
computes an expert, never what is computed. A move permutes the expert weight rows and their optimizer state.

Choosing (`choose`): from the kept choices per (source node, expert) counted over a window of steps, the map with
exactly E_loc experts a rank that maximises the choices served on their own node, minus what the moves cost, as
an assignment of experts to slots solved exactly (`scipy.optimize.linear_sum_assignment`).
"""
import dataclasses

import numpy as np
from scipy.optimize import linear_sum_assignment


def slots_from_ranks(expert_rank, world_size):
    """The slot map of an expert -> rank map: each rank's experts take its slots in expert order.

    Args: expert_rank: sequence of E ints in [0, W), each rank exactly E_loc = E / W times; world_size: W.
    Returns: int64 array [E], a permutation of 0..E-1.
    Raises: ValueError (one line) naming what is wrong when the map is not such a placement.
    """
    ranks = np.asarray(expert_rank)
    e = ranks.size
    if world_size < 1 or e % world_size or e < world_size:
        raise ValueError(f"placement: {e} experts on {world_size} ranks: each rank must host E / W experts "
                         f"(W must divide E)")
    if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer) or ranks.min() < 0 or ranks.max() >= world_size:
        raise ValueError(f"placement {list(expert_rank)}: must list one rank in [0, {world_size}) per expert")
    per_rank = np.bincount(ranks, minlength=world_size)
    if (per_rank != e // world_size).any():
        raise ValueError(f"placement {ranks.tolist()}: ranks host {per_rank.tolist()} experts; each must host "
                         f"exactly E / W = {e // world_size}")
    order = np.argsort(ranks, kind="stable")  # experts grouped by rank, in expert order within a rank
    slots = np.empty(e, np.int64)
    slots[order] = np.arange(e)
    return slots


def placed(topology, expert_rank):
    """`topology` (a `Topology`) with its experts where `expert_rank` (E ranks, `slots_from_ranks`) puts them."""
    slots = slots_from_ranks(expert_rank, topology.world_size)
    return dataclasses.replace(topology, expert_slots=tuple(int(s) for s in slots))


def expert_ranks(slots, world_size):
    """int64 [E]: the rank hosting each expert under the slot map `slots` [E]."""
    slots = np.asarray(slots, np.int64)
    return slots // (slots.size // world_size)


def rows_after_move(old_slots, new_slots):
    """The gather that moves slot-ordered rows: new_rows = old_rows[source] puts expert e's row from slot
    old_slots[e] into slot new_slots[e]. int64 [E] arrays -> int64 [E]."""
    source = np.empty(len(old_slots), np.int64)
    source[np.asarray(new_slots)] = np.asarray(old_slots)
    return source


def choose(kept_by_node, slots, world_size, devices_per_node, saved_per_choice, cost_per_move):
    """The slot map that maximises the bytes saved by serving kept choices on their source node, less the bytes of
    the moves, over all maps with E_loc experts a rank (an exact assignment of experts to slots).

    A move must pay for itself: moving expert e to another slot counts `cost_per_move`, and among maps of equal
    net saving the one with the fewest moves wins, so equal demand never shuffles experts.

    Args:
        kept_by_node: int [N, E]: kept choices of each source node's tokens per expert over the window.
        slots: int [E]: the current slot map.
        world_size W, devices_per_node D.
        saved_per_choice: int bytes saved over the planning horizon per windowed choice served on its node.
        cost_per_move: int bytes that moving one expert sends (weights and optimizer state).
    Returns: int64 [E]: the chosen slot map (`slots` itself when no move pays).
    """
    kept = np.asarray(kept_by_node, np.int64)
    slots = np.asarray(slots, np.int64)
    e = slots.size
    node_of_slot = np.arange(e) // (e // world_size) // devices_per_node  # [E slots]
    served = kept[node_of_slot].T * int(saved_per_choice)  # [E experts, E slots]: bytes saved at that slot
    moved = np.arange(e)[None, :] != slots[:, None]  # [E experts, E slots]
    net = served - moved * int(cost_per_move)
    # exact in float64 while |net| * (E + 1) < 2^53; a tie in net saving goes to the fewer moves
    cost = -(net * (e + 1)) + moved
    if np.abs(cost).max(initial=0) >= 2 ** 53:
        raise ValueError("placement: the window's byte counts are too large to compare exactly; shorten the window")
    experts, chosen = linear_sum_assignment(cost.astype(np.float64))
    result = np.empty(e, np.int64)
    result[experts] = chosen
    return result

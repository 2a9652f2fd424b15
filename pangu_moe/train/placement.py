"""Expert placement during training (parallel.placement_every): count where the kept choices come from, and every
N steps move each MoE layer's experts to the slots `dispatch.placement.choose` picks.

A move permutes the expert weight rows and their Adam moments (`moved_rows`): in this process on `local` and
`simulated` (every rank's experts are here), through one sum over ranks per tensor on `msrun_cpu` and `hccl` (each
process holds its rank's slots). It updates the layer's slot map and the locality masks of the routers that read
it. The routing, capacity and drops are by expert id, so a move changes which rank computes an expert, never the
result. Every process holds the same window (the counts are gathered over ranks before it), so every process
chooses the same map.
Everything a resume needs is in the model's Parameters (`model.moe_layer.MoELayer`'s placement): the slot map,
the window's counts, the routers' masks; a checkpoint carries them.
"""
import dataclasses
import math

import numpy as np
from mindspore import Tensor, ops

from pangu_moe.dispatch.placement import choose, expert_ranks, rows_after_move

VALUE_BYTES = 4  # weights and Adam moments are fp32 whatever train.precision (`precision`)


def moved_rows(rows, source, rank=None, sum_over_ranks=None):
    """The slot rows a process holds after a move.

    Args: rows: numpy [n, ...], the slot rows this process holds before it: all E in one process (`rank` None),
        rank `rank`'s n = E_loc slots [rank*n, (rank+1)*n) with one rank per process; source: int [E], slot s takes
        the row of old slot source[s] (`dispatch.placement.rows_after_move`); sum_over_ranks: numpy [M, ...] ->
        numpy [M, ...], the sum over every rank's argument (one collective; one rank per process only).
    Returns: numpy [n, ...] of rows' dtype.

    With one rank per process, every moved row travels in one sum: its owner writes it, every other rank adds zeros,
    so the rank that receives it gets it exactly. The buffer holds M rows, M the slots whose expert changes: a real
    send/receive would move each once, this moves them to every rank (CPU MindSpore has no Send/Recv; the bytes
    `ExpertPlacement` reports are those of the moves).
    """
    if rank is None:
        return rows[source]
    held = len(rows)
    moved = np.flatnonzero(source != np.arange(len(source)))  # the slots that receive another slot's row
    if not len(moved):
        return rows
    outgoing = np.zeros((len(moved),) + rows.shape[1:], rows.dtype)  # (M, ...)
    for m, slot in enumerate(moved):
        if source[slot] // held == rank:
            outgoing[m] = rows[source[slot] % held]
    received = sum_over_ranks(outgoing)  # (M, ...): every moved row, from its owner
    out = rows.copy()
    for m, slot in enumerate(moved):
        if slot // held == rank:
            out[slot % held] = received[m]
    return out


class ExpertPlacement:
    """The placement of a trainer's model.

    Args: model: `PanguModel`; optimizer: `train.optim.HybridEpsAdamW` over its parameters; topology: the run's
        `Topology` (no placement); every: parallel.placement_every (0: the map stays as built); exchange_bytes:
        bytes per value of the exchanged activations (`train.precision`); hysteresis: parallel.placement_hysteresis;
        data_parallel: `train.data_parallel.DataParallel` with one rank per process (the model holds rank `rank`'s
        experts), None in one process.
    """

    def __init__(self, model, optimizer, topology, every, exchange_bytes, hysteresis=1.0, data_parallel=None, rank=0):
        self.layers = [block.moe for block in model.moe_blocks]
        self.enabled = self.layers[0].expert_slot is not None
        self.topology, self.every = topology, every
        self.rank = None if data_parallel is None else rank
        self.sum_over_ranks = None if data_parallel is None else data_parallel.sum_rows
        self.moments = {p.name: (m, v) for p, m, v in zip(optimizer.parameters, optimizer.moments1,
                                                           optimizer.moments2)}
        experts = self.layers[0].experts
        hidden = experts.w_in.shape[1]
        # A choice served on its own node saves its H-vector both ways; the window's demand is taken to persist
        # for the next `every` steps, so a windowed choice stands for one such choice over that horizon.
        self.saved_per_choice = 2 * hidden * exchange_bytes
        # a moved expert sends its two weights and both Adam moments of each
        self.expert_bytes = 3 * int(np.prod(experts.w_in.shape[1:]) + np.prod(experts.w_out.shape[1:])) * VALUE_BYTES
        self.cost_per_move = math.ceil(hysteresis * self.expert_bytes)  # what a move must save (`choose`)
        self.events = []  # re-placements since the last metrics record

    def slots(self, layer):
        """int64 [E]: MoE layer `layer`'s slot map (the identity without a placement)."""
        moe = self.layers[layer]
        return np.arange(moe.num_experts) if moe.expert_slot is None else moe.expert_slot.asnumpy().astype(np.int64)

    def topology_of(self, layer):
        """The `Topology` MoE layer `layer`'s experts live in (the run's without a placement)."""
        if not self.enabled:
            return self.topology
        return dataclasses.replace(self.topology, expert_slots=tuple(int(s) for s in self.slots(layer)))

    def topologies(self):
        """[`topology_of`(layer) for each MoE layer]."""
        return [self.topology_of(layer) for layer in range(len(self.layers))]

    def observe(self, kept):
        """Add a step's kept choices [L, W, E] (expert order) to each layer's window."""
        if not self.enabled:
            return
        for moe, layer_kept in zip(self.layers, kept):
            ops.assign(moe.placement_window, Tensor(moe.placement_window.asnumpy() + layer_kept.astype(np.int32)))

    def after_step(self, step):
        """Re-place every layer's experts if `step` ends a window (`every`); the event is kept for the next
        metrics record (`events`)."""
        if not self.enabled or not self.every or step % self.every:
            return
        node = np.arange(self.topology.world_size) // self.topology.devices_per_node
        event = {"step": step, "expert_rank": [], "moved": [], "move_bytes_intra": 0, "move_bytes_inter": 0}
        for layer, moe in enumerate(self.layers):
            window = moe.placement_window.asnumpy().astype(np.int64)  # (W, E)
            by_node = np.zeros((self.topology.nodes, window.shape[1]), np.int64)
            np.add.at(by_node, node, window)  # (N, E)
            old = self.slots(layer)
            new = choose(by_node, old, self.topology.world_size, self.topology.devices_per_node,
                         self.saved_per_choice, self.cost_per_move)
            if (new != old).any():
                self.move(layer, old, new)
            old_node = node[expert_ranks(old, self.topology.world_size)]
            new_rank = expert_ranks(new, self.topology.world_size)
            moved = new != old
            crossing = int((moved & (old_node != node[new_rank])).sum())
            event["expert_rank"].append(new_rank.tolist())
            event["moved"].append(int(moved.sum()))
            event["move_bytes_inter"] += crossing * self.expert_bytes
            event["move_bytes_intra"] += (int(moved.sum()) - crossing) * self.expert_bytes
            ops.assign(moe.placement_window, Tensor(np.zeros(window.shape, np.int32)))
        self.events.append(event)

    def move(self, layer, old, new):
        """Move MoE layer `layer`'s experts from slot map `old` to `new` (int [E]): weights, Adam moments, the
        map and the router's masks."""
        moe = self.layers[layer]
        source = rows_after_move(old, new)
        for weight in (moe.experts.w_in, moe.experts.w_out):
            for tensor in (weight, *self.moments[weight.name]):
                # assign, not set_data: a compiled step keeps reading the Parameter's original memory
                ops.assign(tensor, Tensor(moved_rows(tensor.asnumpy(), source, self.rank, self.sum_over_ranks)))
        ops.assign(moe.expert_slot, Tensor(np.asarray(new, np.int32)))
        moe.router.place(self.topology_of(layer))

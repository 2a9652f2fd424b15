"""The cluster layout the routers may read: N nodes x D devices, and where each expert lives."""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Topology:
    """W = N * D ranks; experts placed contiguously in rank order.

    With E >= W each rank hosts E_loc = E / W consecutive experts; with E < W each expert spans
    W / E ranks and lives on the node of its first rank (LocMoE's placement: node(e) =
    floor(e * devices_per_expert / D)), so some nodes may host no expert.

    A placement map (`dispatch.placement`) moves experts between ranks: with `expert_slots`, expert e lives in
    slot expert_slots[e], on rank expert_slots[e] // E_loc (E % W == 0 only).

    Args:
        nodes: N; devices_per_node: D; num_experts: E (E % W == 0 or W % E == 0);
        expert_slots: None (expert e in slot e) or a tuple of E ints, a permutation of 0..E-1.
    """
    nodes: int
    devices_per_node: int
    num_experts: int
    expert_slots: tuple = None

    def __post_init__(self):
        w, e = self.world_size, self.num_experts
        if e % w and w % e:
            raise ValueError(f"Topology: num_experts = {e} and world size {w}: one must divide the other")
        if self.expert_slots is not None and (e % w or sorted(self.expert_slots) != list(range(e))):
            raise ValueError(f"Topology: expert_slots = {self.expert_slots}: must be a permutation of 0..{e - 1} "
                             f"with W = {w} dividing E")

    @property
    def world_size(self):
        return self.nodes * self.devices_per_node

    def expert_rank(self):
        """int array [E]: the (first) rank hosting each expert."""
        e, w = self.num_experts, self.world_size
        experts = np.arange(e) if self.expert_slots is None else np.asarray(self.expert_slots, np.int64)
        return experts // (e // w) if e >= w else experts * (w // e)

    def expert_node(self):
        """int array [E]: the node hosting each expert."""
        return self.expert_rank() // self.devices_per_node

    def local_expert_mask(self):
        """bool array [W, E]: expert e lives on the node of rank r."""
        rank_node = np.arange(self.world_size) // self.devices_per_node
        return rank_node[:, None] == self.expert_node()[None, :]

    def placement_classes(self):
        """int array [W, E]: 0 if expert e lives on rank r (local), 1 on another rank of r's node
        (intra-node), 2 on another node (inter-node). An expert spanning several ranks (E < W) is local
        to each of them."""
        w, e = self.world_size, self.num_experts
        ranks = np.arange(w)
        first = self.expert_rank()
        span = max(1, w // e)
        on_rank = (ranks[:, None] >= first[None, :]) & (ranks[:, None] < first[None, :] + span)
        same_node = self.local_expert_mask()
        return np.where(on_rank, 0, np.where(same_node, 1, 2))

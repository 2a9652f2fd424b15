"""LocMoE's group-wise exchange (MindSpore's `group_wise_a2a`): slice, all-to-all over the expert-parallel
group, AllGather over the tensor-parallel group.

Layout. W = N·D ranks form tensor-parallel (tp) groups of mp consecutive ranks inside a node (rank r is
member t = r mod mp of tp group g = r // mp) and mp expert-parallel (ep) groups of the G = W/mp ranks at
the same tp position. The members of a tp group hold the same tokens (tensor parallelism replicates the
activations; this model has none, so the replication is simulated by giving them the same send buffer)
and the same experts, E_loc = E/G a rank. A rank's send buffer is [G, E_loc, C, H]: slot block q goes to
ep member q, which hosts those experts.

- plain (`plain_exchange`): every rank sends each block whole to its ep peer: (G-1)·E_loc·C·H values a rank
  cross the all-to-all, mp times the same data per tp group.
- group-wise (`GroupWiseExchange`): member t sends only slots [t·C/mp, (t+1)·C/mp) of every block (C a
  multiple of mp), so the all-to-all carries 1/mp of the plain bytes; the tp group then AllGathers the
  received slices (inside the node) and every member holds the plain exchange's result exactly.

The same function serves the combine direction (expert outputs back to the tokens' ranks): the replicated
experts computed the same outputs on every member of the tp group.

This is an exchange primitive with its equivalence and byte counts (`tests/dispatch/test_group_wise.py`,
simulated and msrun_cpu); the training step does not use it (the model has no tensor parallelism) and it
has no backward. Its bytes are in the cost model (`accounting.cost.exchange_seconds`, `tensor_parallel`).
"""
from mindspore import nn, ops

from pangu_moe.dispatch.collectives import make_all_to_all


def check_layout(devices_per_node, mp, capacity=None):
    """ValueError unless tp groups of `mp` fit inside a node (mp divides D) and C (if given) is a multiple of mp."""
    if mp < 1 or devices_per_node % mp:
        raise ValueError(f"group-wise exchange: tensor-parallel size {mp} must divide the {devices_per_node} "
                         f"devices of a node (the AllGather stays inside the node)")
    if capacity is not None and capacity % mp:
        raise ValueError(f"group-wise exchange: capacity {capacity} must be a multiple of the tensor-parallel size "
                         f"{mp} (pad C up, as MindSpore's group_wise_a2a does)")


def plain_exchange(send, mp):
    """The plain exchange of all W ranks in one process: send [W, G, E_loc, C, H] -> received [W, G, E_loc, C, H]
    (block q of rank g·mp + t came from rank q·mp + t)."""
    w, g = send.shape[:2]
    rest = send.shape[2:]
    grid = send.reshape((g, mp, g) + rest)  # (source tp group, position, destination tp group, ...)
    return ops.swapaxes(grid, 0, 2).reshape((w, g) + rest)


class GroupWiseExchange(nn.Cell):
    """Args: backend ("simulated": all W ranks in this process; "msrun_cpu", "hccl": one rank); rank: this
    process's world rank (0 for simulated); nodes N, devices_per_node D; mp: tensor-parallel size."""

    def __init__(self, backend, rank, nodes, devices_per_node, mp):
        super().__init__()
        check_layout(devices_per_node, mp)  # C is checked by the caller that sizes the buffers
        self.simulated = backend == "simulated"
        self.mp, self.position = mp, rank % mp
        if not self.simulated:
            self.ep = make_all_to_all(backend, "ep", rank, nodes, devices_per_node, mp)
            self.tp = make_all_to_all(backend, "tp", rank, nodes, devices_per_node, mp)

    def construct(self, send):
        """send [R, G, E_loc, C, H] (R = W simulated, else 1) -> received [R, G, E_loc, C, H]."""
        c = send.shape[3] // self.mp
        if self.simulated:
            return self._simulated(send, c)
        mine = send[:, :, :, self.position * c:(self.position + 1) * c]  # (1, G, E_loc, C/mp, H): my slice
        got = self.ep(mine)  # (1, G, E_loc, C/mp, H): my slice of every source's block for my experts
        slices = self.tp.gather(got)  # (mp, G, E_loc, C/mp, H): every member's slice
        g, e, h = got.shape[1], got.shape[2], got.shape[4]
        return ops.transpose(slices, (1, 2, 0, 3, 4)).reshape((1, g, e, self.mp * c, h))  # slices in slot order

    def _simulated(self, send, c):
        w, g, e, _, h = send.shape
        mp = self.mp
        # Member t of every tp group keeps slice t of its buffer: (W, G, E_loc, C/mp, H).
        grid = send.reshape((g, mp, g, e, mp, c, h))
        mine = ops.stack([grid[:, t, :, :, t] for t in range(mp)], 1).reshape((w, g, e, c, h))
        got = plain_exchange(mine, mp)  # the ep all-to-all of the slices
        # AllGather in each tp group: member s's slice s, in slot order, for every member.
        slices = got.reshape((g, mp, g, e, c, h))  # (tp group, member s, source, E_loc, C/mp, H)
        whole = ops.transpose(slices, (0, 2, 3, 1, 4, 5)).reshape((g, 1, g, e, mp * c, h))
        return ops.broadcast_to(whole, (g, mp, g, e, mp * c, h)).reshape((w, g, e, mp * c, h))


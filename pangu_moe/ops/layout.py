"""moe_dispatch_layout: buffer rows in the node-major send order, and the token counts per expert,
destination rank and destination node (kernels/README.md). `reference_layout` is the specification.
"""
import mindspore as ms
from mindspore import nn, ops

from pangu_moe.ops.custom import aot_op


def reference_layout(pair_index, slot, keep, requested, capacity, num_ranks, num_experts, world_size, nodes):
    """The layout by plain MindSpore ops (segment sums, no one-hot).

    Args:
        pair_index: [T, K] int32, source_rank * E + expert of each choice (R source ranks held);
        slot: [T, K] int32; keep, requested: [T, K] bool (keep implies requested);
        capacity: python int C; num_ranks: R; num_experts: E; world_size: W; nodes: N
        (E % W == 0 or W % E == 0, as `dispatch.topology.Topology`).
    Returns:
        flat_index [T*K] int32 (pair * C + slot, or R*E*C if dropped), tokens_per_expert [R, E] int32
        (requested), kept_per_expert [R, E] int32, send_counts [R, W] int32 (kept, by destination rank),
        node_counts [R, N] int32 (kept, by destination node).
    """
    buffers = num_ranks * num_experts
    rows = pair_index * capacity + slot
    flat_index = ops.select(keep, rows, ops.full_like(rows, buffers * capacity)).reshape(-1)  # (T*K,)
    segments = pair_index.reshape(-1)  # (T*K,) rank-major (R*E) segment ids
    demand = ops.unsorted_segment_sum(requested.reshape(-1).astype(ms.int32), segments, buffers)
    kept = ops.unsorted_segment_sum(keep.reshape(-1).astype(ms.int32), segments, buffers)
    kept = kept.reshape(num_ranks, num_experts)  # (R, E) <- (R*E,)
    if num_experts >= world_size:
        send = kept.reshape(num_ranks, world_size, num_experts // world_size).sum(-1)  # (R, W) <- (R, W, E_loc)
    else:  # each expert on W / E ranks: its tokens count at its first rank (Topology.expert_rank)
        send = ops.concat((kept.reshape(num_ranks, num_experts, 1),
                           ops.zeros((num_ranks, num_experts, world_size // num_experts - 1), ms.int32)), 2)
        send = send.reshape(num_ranks, world_size)  # (R, W) <- (R, E, W/E)
    per_node = send.reshape(num_ranks, nodes, world_size // nodes).sum(-1)  # (R, N) <- (R, N, D)
    return flat_index, demand.reshape(num_ranks, num_experts), kept, send, per_node


class ReferenceLayout(nn.Cell):
    """`reference_layout` as a cell. Args: num_ranks R, num_experts E, world_size W, nodes N."""

    def __init__(self, num_ranks, num_experts, world_size, nodes):
        super().__init__()
        if (num_experts % world_size and world_size % num_experts) or world_size % nodes:
            raise ValueError(f"dispatch layout: E = {num_experts}, W = {world_size}, N = {nodes}: one of E and W "
                             f"must divide the other, and N must divide W")
        self.num_ranks, self.num_experts, self.world_size, self.nodes = num_ranks, num_experts, world_size, nodes

    def construct(self, pair_index, slot, keep, requested, capacity):
        """pair_index, slot [T, K] int32; keep, requested [T, K] bool; capacity python int -> see `reference_layout`."""
        return reference_layout(pair_index, slot, keep, requested, capacity, self.num_ranks, self.num_experts,
                                self.world_size, self.nodes)


class CustomLayout(ReferenceLayout):
    """moe_dispatch_layout by the `cpu` or `ascend` kernels (same call and outputs as `ReferenceLayout`)."""

    def __init__(self, num_ranks, num_experts, world_size, nodes, backend):
        super().__init__(num_ranks, num_experts, world_size, nodes)

        def shape(pair_index, slot, keep, requested, options):
            return ([pair_index[0] * pair_index[1]], [num_ranks, num_experts], [num_ranks, num_experts],
                    [num_ranks, world_size], [num_ranks, nodes])

        def dtype(pair_index, slot, keep, requested, options):
            return ms.int32, ms.int32, ms.int32, ms.int32, ms.int32

        self.layout = aot_op("MoeDispatchLayout", backend,
                             (("pair_index", "i32"), ("slot", "i32"), ("keep", "bool"), ("requested", "bool"),
                              ("options", "i32")),
                             (("flat_index", "i32"), ("tokens_per_expert", "i32"), ("kept_per_expert", "i32"),
                              ("send_counts", "i32"), ("node_counts", "i32")), shape, dtype,
                             attrs={"num_ranks_held": num_ranks, "num_experts": num_experts,
                                    "world_size": world_size, "nodes": nodes})

    def construct(self, pair_index, slot, keep, requested, capacity):
        """As `ReferenceLayout.construct`."""
        return self.layout(pair_index, slot, keep, requested, ms.Tensor([capacity], ms.int32))

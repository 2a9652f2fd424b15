"""Dispatch and combine: routed tokens into per-(source rank, expert) buffers [R*E, C, H] and back.

The buffers are every held rank's destination-major send buffer (`model.moe_layer.MoELayer`). The
three steps are kernel ops (`pangu_moe.ops`), so `runtime.kernels` picks plain MindSpore or the
custom kernels: moe_dispatch_layout (buffer row of every choice and the counts), moe_permute
(gather into the buffer) and moe_unpermute (gate-weighted sum back). No [T, E, C] one-hot is built.
"""
from mindspore import nn

from pangu_moe.ops import make_op


class Dispatcher(nn.Cell):
    """Permute tokens into buffers and un-permute them; no communication (that is `dispatch.exchange`).

    Args:
        num_experts: E.
        num_ranks: R source ranks whose tokens this process holds (R*E buffers).
        world_size: W ranks and nodes: N, for the per-rank and per-node counts (E % W == 0 or W % E == 0).
        backend: an `ops.KERNEL_BACKENDS` name.
    """

    compact = False  # True on `ops.shipped.CompactDispatcher` (ascend_builtin), which has no buffers

    def __init__(self, num_experts, num_ranks=1, world_size=1, nodes=1, backend="reference"):
        super().__init__()
        self.num_buffers = num_ranks * num_experts
        self.layout_op = make_op("moe_dispatch_layout", backend, num_ranks, num_experts, world_size, nodes)
        self.permute = make_op("moe_permute", backend, self.num_buffers)
        self.unpermute = make_op("moe_unpermute", backend)

    def layout(self, pair_index, slot, keep, requested, capacity):
        """Buffer rows and token accounting.

        Args: pair_index [T, K] int32 (source rank * E + expert); slot [T, K] int32; keep, requested [T, K] bool;
            capacity: python int C.
        Returns: flat_index [T*K] int32 (row pair * C + slot, or R*E*C if dropped), tokens_per_expert [R, E]
            int32 (requested), kept_per_expert [R, E] int32, send_counts [R, W] int32, node_counts [R, N] int32.
        """
        return self.layout_op(pair_index, slot, keep, requested, capacity)

    def dispatch(self, x, flat_index, capacity):
        """x [T, H], flat_index [T*K] int32 -> expert_in [R*E, C, H], zero in unused slots."""
        return self.permute(x, flat_index, capacity)

    def combine(self, expert_out, flat_index, gate, keep):
        """Un-permute and weight by the gate; dropped choices contribute exactly 0.

        Args: expert_out [R*E, C, H] (the compute dtype); flat_index [T*K] int32; gate [T, K] fp32; keep [T, K] bool.
        Returns: y [T, H] fp32 (the gate multiplies the rows in fp32).
        """
        return self.unpermute(expert_out, flat_index, gate * keep.astype(gate.dtype))

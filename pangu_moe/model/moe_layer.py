"""The MoE layer: route -> dispatch -> experts -> combine, each step its own cell."""
import mindspore as ms
from mindspore import nn, ops


class MoELayer(nn.Cell):
    """Sparse FFN replacing the dense FFN of a block.

    Args:
        router: a `routing.base.Router`.
        dispatcher: an exchange backend (e.g. `dispatch.local.LocalDispatcher`).
        experts: `experts.GroupedExperts`.
    """

    def __init__(self, router, dispatcher, experts):
        super().__init__()
        self.router = router
        self.dispatcher = dispatcher
        self.experts = experts
        self.num_experts = router.num_experts

    def construct(self, x, token_ids, group_ids, capacity, training):
        """Apply the layer to one routing group.

        Args:
            x: [T, H]; token_ids, group_ids: [T] int32; capacity: python int C; training: python bool.
        Returns:
            y [T, H] (0 for fully dropped tokens; the block's residual carries them),
            losses [3] fp32 (weighted, named by `routing.base.LOSS_NAMES`),
            tokens_per_expert [E] int32 (demand before dropping), kept_per_expert [E] int32.
        """
        expert_index, gate, keep, slot, losses = self.router(x, token_ids, group_ids, capacity, training)
        flat_index = self.dispatcher.flat_index(expert_index, keep, slot, capacity)
        expert_in = self.dispatcher.dispatch(x, flat_index, capacity)
        expert_out = self.experts(expert_in)
        y = self.dispatcher.combine(expert_out, flat_index, gate, keep)
        tokens_per_expert, kept_per_expert = expert_counts(expert_index, keep, self.num_experts)
        return y, losses, tokens_per_expert, kept_per_expert


def expert_counts(expert_index, keep, num_experts):
    """Exact token accounting: demand and kept choices per expert, by segment sums (no one-hot).

    Args: expert_index [T, K] int32; keep [T, K] bool.
    Returns: tokens_per_expert [E] int32, kept_per_expert [E] int32; sum(tokens_per_expert) = T*K.
    """
    segments = expert_index.reshape(-1)  # (T*K,)
    kept = keep.reshape(-1).astype(ms.int32)  # (T*K,)
    demand = ops.unsorted_segment_sum(ops.ones_like(kept), segments, num_experts)
    return demand, ops.unsorted_segment_sum(kept, segments, num_experts)

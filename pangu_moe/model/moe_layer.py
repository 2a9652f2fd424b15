"""The MoE layer: route -> dispatch -> experts -> combine, each step its own cell."""
import mindspore as ms
from mindspore import nn, ops


class MoELayer(nn.Cell):
    """Sparse FFN replacing the dense FFN of a block.

    Args:
        router: a `routing.base.Router`.
        dispatcher: an exchange backend (e.g. `dispatch.local.LocalDispatcher`).
        experts: `experts.GroupedExperts`.
        num_ranks: W ranks whose tokens are counted apart (rank r holds tokens [r*T/W, (r+1)*T/W)).
    """

    def __init__(self, router, dispatcher, experts, num_ranks=1):
        super().__init__()
        self.router = router
        self.dispatcher = dispatcher
        self.experts = experts
        self.num_experts = router.num_experts
        self.num_ranks = num_ranks

    def construct(self, x, token_ids, group_ids, capacity, training):
        """Apply the layer to one routing group.

        Args:
            x: [T, H]; token_ids, group_ids: [T] int32; capacity: python int C; training: python bool.
        Returns:
            y [T, H] (0 for fully dropped tokens; the block's residual carries them),
            losses [3] fp32 (weighted, named by `routing.base.LOSS_NAMES`),
            tokens_per_expert [W, E] int32 (requested choices of each rank's tokens, before dropping),
            kept_per_expert [W, E] int32,
            score [T] fp32: sum over kept choices of gate * log_prob for REINFORCE routers, else 0.
        """
        expert_index, gate, keep, slot, requested, losses, log_prob = self.router(x, token_ids, group_ids, capacity,
                                                                                  training)
        flat_index = self.dispatcher.flat_index(expert_index, keep, slot, capacity)
        expert_in = self.dispatcher.dispatch(x, flat_index, capacity)
        expert_out = self.experts(expert_in)
        y = self.dispatcher.combine(expert_out, flat_index, gate, keep)
        score = ops.zeros(x.shape[:1], ms.float32)
        if self.router.reinforce:
            # The gate is a gradient scale only (Kool's HT weight): forward sum(keep * out), backward gate * d out.
            unweighted = self.dispatcher.combine(expert_out, flat_index, ops.ones_like(gate), keep)
            y = ops.stop_gradient(unweighted) + y - ops.stop_gradient(y)
            # stop_gradient: the bool keep mask must not collect gradients (MindSpore cannot add bool grads).
            score = (ops.stop_gradient(keep.astype(ms.float32) * gate) * log_prob).sum(1)
        tokens_per_expert, kept_per_expert = expert_counts(expert_index, requested, keep, self.num_experts,
                                                           self.num_ranks)
        return y, losses, tokens_per_expert, kept_per_expert, score


def expert_counts(expert_index, requested, keep, num_experts, num_ranks=1):
    """Exact token accounting per source rank and expert, by segment sums (no one-hot).

    Args: expert_index [T, K] int32; requested, keep [T, K] bool; W = num_ranks divides T.
    Returns: tokens_per_expert [W, E] int32 (requested choices), kept_per_expert [W, E] int32;
        for token-choice routers sum(tokens_per_expert) = T*K.
    """
    num_tokens, top_k = expert_index.shape
    rank = (ops.arange(num_tokens, dtype=ms.int32) // (num_tokens // num_ranks)).reshape(-1, 1)  # (T, 1)
    segments = (rank * num_experts + expert_index).reshape(-1)  # (T*K,): rank-major (W*E) segment ids
    kept = keep.reshape(-1).astype(ms.int32)  # (T*K,)
    demand = ops.unsorted_segment_sum(requested.reshape(-1).astype(ms.int32), segments, num_ranks * num_experts)
    kept = ops.unsorted_segment_sum(kept, segments, num_ranks * num_experts)
    return demand.reshape(num_ranks, num_experts), kept.reshape(num_ranks, num_experts)  # (W, E) <- (W*E,)

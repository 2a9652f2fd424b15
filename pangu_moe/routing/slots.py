"""Slot assignment under capacity: a pure function of the chosen experts."""
import mindspore as ms
from mindspore import ops


def position_slots(expert_index, num_experts, capacity):
    """Position policy: first come, first served, with every first choice before any second choice.

    Args:
        expert_index: [T, K] int32 global expert ids.
        num_experts: E.
        capacity: C, slots per expert.
    Returns:
        slot: [T, K] int32, the position of choice (t, k) in its expert's arrival order
              (contiguous from 0 per expert; may be >= C).
        keep: [T, K] bool, slot < C.
    """
    num_tokens, top_k = expert_index.shape
    order = expert_index.T.reshape(-1)  # (K*T,) <- (K, T): all first choices, then all second choices
    onehot = ops.one_hot(order, num_experts, ms.Tensor(1, ms.int32), ms.Tensor(0, ms.int32))  # (K*T, E)
    position = (ops.cumsum(onehot, 0) * onehot).sum(1).astype(ms.int32) - 1  # (K*T,)
    slot = position.reshape(top_k, num_tokens).T  # (T, K) <- (K, T)
    return slot, slot < capacity

"""Slot assignment under capacity: pure functions of the chosen experts.

A policy decides which choices an over-subscribed expert keeps (docs/architecture.md, Routers):
- position: first come, first served, every first choice before any second choice (Switch, GShard);
- probs: the choices with the highest gate (Megatron `drop_policy=probs`);
- random: a uniformly random subset (DeepSpeed RTS; the keep rule of Kool's skip estimator);
  evaluation falls back to position, so evaluation is deterministic;
- affinity: the choices with the highest router affinity (LocMoE+ ECR);
- none: dropless. Slots as position; the planned capacity is T (`capacity.plan_capacities`), and the trainer's
  buffers, sized by the demand, always hold every requested choice (`Trainer.run_step`).
The capacity itself is decided in `pangu_moe/capacity.py`; this module only assigns slots under it.
Choices that were not requested (`requested` False) take no slot and are never kept.
"""
import mindspore as ms
from mindspore import Tensor, ops

from pangu_moe.config import SLOT_POLICIES
from pangu_moe.ops.gating import keep_under_capacity, position_slots  # the position policy is moe_gating's spec


def priority_slots(expert_index, priority, num_experts, capacity, requested=None):
    """Per expert, slots in descending `priority` (the probs, random and affinity policies).

    Args:
        expert_index: [T, K] int32; priority: [T, K] fp32 (higher is served first); requested: as above.
    Returns:
        slot [T, K] int32 (rank among the expert's requested choices), keep [T, K] bool.
    """
    num_tokens, top_k = expert_index.shape
    flat_priority = priority.reshape(-1).astype(ms.float32)  # (T*K,)
    _, order = ops.sort(flat_priority, descending=True)
    sorted_experts = ops.gather(expert_index.reshape(-1), order, 0)  # (T*K,) in service order
    onehot = ops.one_hot(sorted_experts, num_experts, Tensor(1, ms.int32), Tensor(0, ms.int32))  # (T*K, E)
    if requested is not None:
        onehot = onehot * ops.gather(requested.reshape(-1), order, 0).reshape(-1, 1).astype(ms.int32)
    sorted_slot = (ops.cumsum(onehot, 0) * onehot).sum(1).astype(ms.int32) - 1  # (T*K,)
    inverse = ops.argsort(order.astype(ms.float32))  # position of each choice in the service order
    slot = ops.gather(sorted_slot, inverse, 0).reshape(num_tokens, top_k)  # (T, K) <- (T*K,)
    return slot, keep_under_capacity(slot, capacity, requested)


def assign_slots(policy, expert_index, gate, affinity, num_experts, capacity, training, requested=None, keys=None):
    """Dispatch on the policy name (a python string, so graph mode keeps one branch).

    Args:
        policy: one of `SLOT_POLICIES`; expert_index [T, K] int32; gate, affinity [T, K] fp32;
        capacity: C; training: python bool; requested: optional [T, K] bool;
        keys: the random policy's U[0, 1) priorities [T, K] fp32 (`Router.uniform_noise`), else drawn here.
    Returns:
        slot [T, K] int32, keep [T, K] bool.
    """
    if policy not in SLOT_POLICIES:
        raise ValueError(f"slot policy {policy!r}: must be one of {', '.join(SLOT_POLICIES)}")
    if policy == "probs":
        return priority_slots(expert_index, gate, num_experts, capacity, requested)
    if policy == "affinity":
        return priority_slots(expert_index, affinity, num_experts, capacity, requested)
    if policy == "random" and training:
        if keys is None:
            keys = ops.uniform(expert_index.shape, Tensor(0.0, ms.float32), Tensor(1.0, ms.float32))
        return priority_slots(expert_index, keys, num_experts, capacity, requested)
    return position_slots(expert_index, num_experts, capacity, requested)


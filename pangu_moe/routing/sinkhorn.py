"""Sinkhorn (S-BASE) routing, as Megatron-Core does it: balanced selection, ungated by the balancing.

Training, without gradient, in fp32: K = exp(logits); alternate row and column scaling a fixed number of
times so that rows sum to 1/T and each group's columns share their group's mass equally; then each
token takes the top-k of the scaled matrix. Row scaling does not change a row's order, so the selection
is top-k of logits + log d1 (a per-batch per-expert bias). Gates are sigmoid(logit)
for K = 1 and softmax(logits) at the chosen experts for K > 1, and carry the gradient. Evaluation takes
the top-k of the gates directly. No load-balancing loss (Megatron forbids it with Sinkhorn); z-loss allowed.
With G groups each group is balanced over its own tokens.
"""
import mindspore as ms
from mindspore import Tensor, ops

from pangu_moe.routing import losses
from pangu_moe.routing.base import LearnedRouter, register, stack_losses


def sinkhorn_bias(logits, group_ids, num_groups, iterations, eps=1e-9):
    """log d1 of the Sinkhorn scaling, per token's group.

    Args:
        logits: [T, E_g] fp32 (inside each token's group); group_ids: [T] int32; iterations: fixed count.
    Returns:
        [T, E_g] fp32 log column scale of each token's group (no gradient).
    """
    logits = ops.stop_gradient(logits)
    num_tokens, experts_per_group = logits.shape
    one, zero = Tensor(1.0, ms.float32), Tensor(0.0, ms.float32)
    onehot = ops.one_hot(group_ids, num_groups, one, zero)  # (T, G)
    group_share = onehot.sum(0).reshape(-1, 1) / (num_tokens * experts_per_group)  # (G, 1): column target
    k = ops.exp(logits - logits.max())  # a global shift leaves the scaled matrix unchanged
    d1 = ops.ones((num_groups, experts_per_group), ms.float32)
    for _ in range(iterations):
        per_token_d1 = ops.matmul(onehot, d1)  # (T, E_g)
        d0 = (1.0 / num_tokens) / ((k * per_token_d1).sum(1, keepdims=True) + eps)  # (T, 1)
        column = ops.matmul(onehot.T, k * d0)  # (G, E_g)
        d1 = group_share / (column + eps)
    return ops.log(ops.matmul(onehot, d1) + eps)


@register
class SinkhornRouter(LearnedRouter):
    """Args: hidden H; num_experts E; num_groups G; top_k K; z_loss_coeff; iterations; init_std;
    slot_policy (capacity still applies: balancing is approximate for the hard top-k)."""

    name = "sinkhorn"
    loss_terms = ("z",)  # balanced by the scaling; Megatron-Core forbids an aux loss with Sinkhorn

    def __init__(self, hidden, num_experts, num_groups, top_k, z_loss_coeff, iterations=30, init_std=0.02,
                 slot_policy="position"):
        super().__init__(hidden, num_experts, num_groups, top_k, init_std, slot_policy)
        self.z_loss_coeff, self.iterations = z_loss_coeff, iterations

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        return cls(model_cfg.hidden, moe_cfg.num_experts, moe_cfg.num_groups, moe_cfg.top_k, moe_cfg.z_loss_coeff,
                   moe_cfg.sinkhorn.iterations, moe_cfg.topk.init_std, moe_cfg.slot_policy)

    def score(self, x, token_ids, group_ids, training, rank=None):
        logits = self.logits(x, group_ids)
        gates = ops.sigmoid(logits) if self.top_k == 1 else ops.softmax(logits, axis=-1)
        ranking = gates
        if training:
            ranking = logits + sinkhorn_bias(logits, group_ids, self.num_groups, self.iterations)
        _, local_index = ops.topk(ranking, self.top_k)
        local_index = local_index.astype(ms.int32)
        gate = ops.gather_elements(gates, 1, local_index)
        affinity = ops.gather_elements(logits, 1, local_index)
        zero = ops.zeros((), ms.float32)
        return local_index, gate, affinity, None, stack_losses(zero, losses.z_loss(logits, self.z_loss_coeff), zero)

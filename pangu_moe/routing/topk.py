"""Learned top-k router: Switch (K = 1) and GShard-style (K = 2), inside a level-1 group."""

import mindspore as ms
from mindspore import Parameter, Tensor, ops
from mindspore.common.initializer import Normal, initializer

from pangu_moe.routing import losses
from pangu_moe.routing.base import Router, group_logits


def topk_scores(logits, top_k, normalize):
    """Softmax-then-top-k, the scoring rule as a pure function.

    The softmax is over all E_g experts of the group *before* top-k, so for K = 1 the gate is the full
    softmax probability (not 1.0) and the LM loss trains the router.

    Args:
        logits: [T, E_g] fp32.
        top_k: K.
        normalize: K > 1 only: renormalise the K gates to sum to 1 (GShard).
    Returns:
        scores [T, E_g] fp32, local_index [T, K] int32, gate [T, K] fp32.
    """
    scores = ops.softmax(logits, axis=-1)
    gate, local_index = ops.topk(scores, top_k)
    if normalize and top_k > 1:
        gate = gate / gate.sum(-1, keepdims=True)
    return scores, local_index.astype(ms.int32), gate


class TopKRouter(Router):
    """Learned linear router, one [H, E_g] weight per group (stored as [G, H, E_g]).

    Per-group weights make the logits of a token bit-identical to those of the extracted domain
    sub-model, whose router is that group's slice.
    """

    def __init__(self, hidden, num_experts, num_groups, top_k, aux_loss_coeff, z_loss_coeff,
                 jitter_eps=0.0, normalize=True, init_std=0.02):
        super().__init__(num_experts, num_groups, top_k)
        shape = (num_groups, hidden, self.experts_per_group)
        self.weight = Parameter(initializer(Normal(init_std), shape, ms.float32), name="weight")
        self.aux_loss_coeff = aux_loss_coeff
        self.z_loss_coeff = z_loss_coeff
        self.jitter_eps = jitter_eps
        self.normalize = normalize

    def score(self, x, token_ids, group_ids, training):
        x = x.astype(ms.float32)
        if training and self.jitter_eps > 0:
            x = x * ops.uniform(x.shape, Tensor(1.0 - self.jitter_eps, ms.float32),
                                Tensor(1.0 + self.jitter_eps, ms.float32))
        logits_all = ops.matmul(x, self.weight)  # (G, T, E_g) <- (T, H) @ (G, H, E_g)
        logits = group_logits(logits_all, group_ids, self.experts_per_group)
        scores, local_index, gate = topk_scores(logits, self.top_k, self.normalize)
        aux = losses.load_balancing_loss(scores, local_index, group_ids, self.num_groups, self.aux_loss_coeff)
        return local_index, gate, aux, losses.z_loss(logits, self.z_loss_coeff)




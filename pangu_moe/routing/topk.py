"""Learned top-k router: Switch (K = 1) and GShard-style (K = 2), inside a level-1 group."""

import mindspore as ms
from mindspore import Tensor, ops

from pangu_moe.ops.gating import SOFTMAX, SOFTMAX_NORMALIZE, gating_scores
from pangu_moe.routing import losses
from pangu_moe.routing.base import LearnedRouter, stack_losses


def multiplicative_jitter(x, eps, u=None):
    """Switch-style router-input noise: x * U(1 - eps, 1 + eps), element-wise. x [T, H] fp32; u: U[0, 1)
    noise [T, H] fp32 (`Router.uniform_noise`), or None to draw it here."""
    if u is None:
        u = ops.uniform(x.shape, Tensor(0.0, ms.float32), Tensor(1.0, ms.float32))
    return x * (1.0 - eps + 2.0 * eps * u)


def topk_scores(logits, top_k, normalize):
    """Softmax-then-top-k, the scoring rule as a pure function (`ops.gating.gating_scores`).

    The softmax is over all E_g experts of the group *before* top-k, so for K = 1 the gate is the full
    softmax probability (not 1.0) and the LM loss trains the router. The choice is the top-k of the
    logits (the same experts; ties go to the lower id).

    Args:
        logits: [T, E_g] fp32.
        top_k: K.
        normalize: K > 1 only: renormalise the K gates to sum to 1 (GShard), before any capacity dropping.
    Returns:
        scores [T, E_g] fp32, local_index [T, K] int32, gate [T, K] fp32.
    """
    return gating_scores(logits, top_k, SOFTMAX_NORMALIZE if normalize else SOFTMAX)


class TopKRouter(LearnedRouter):
    """Learned linear router, one [H, E_g] weight per group (stored as [G, H, E_g]).

    Per-group weights make the logits of a token bit-identical to those of the extracted domain
    sub-model, whose router is that group's slice.

    Args:
        hidden: H; num_experts: E; num_groups: G; top_k: K.
        aux_loss_coeff: alpha of `losses.load_balancing_loss` (f counts all K choices, divided by K,
            as Megatron does; GShard counts first choices only); z_loss_coeff: of `losses.z_loss`.
        jitter_eps: training-only `multiplicative_jitter`; 0 disables it.
        normalize: K > 1: renormalise the K gates (see `topk_scores`).
        init_std: normal init std of the [G, H, E_g] weight.
        slot_policy: see `routing.slots`; the affinity of a choice is its logit.
    """

    def __init__(self, hidden, num_experts, num_groups, top_k, aux_loss_coeff, z_loss_coeff,
                 jitter_eps=0.0, normalize=True, init_std=0.02, slot_policy="position"):
        super().__init__(hidden, num_experts, num_groups, top_k, init_std, slot_policy)
        self.aux_loss_coeff = aux_loss_coeff
        self.z_loss_coeff = z_loss_coeff
        self.jitter_eps = jitter_eps
        self.normalize = normalize

    @property
    def gating_mode(self):
        """moe_gating's mode for this router (`ops.gating`): softmax, renormalised when K > 1 and `normalize`."""
        return SOFTMAX_NORMALIZE if self.normalize and self.top_k > 1 else SOFTMAX

    def noise_shapes(self, tokens):
        shapes = super().noise_shapes(tokens)
        if self.jitter_eps > 0:
            shapes["jitter"] = (tokens, self.weight.shape[1])  # (T, H)
        return shapes

    def gating_logits(self, x, group_ids, training, rank=None):
        x = x.astype(ms.float32)
        if training and self.jitter_eps > 0:
            x = multiplicative_jitter(x, self.jitter_eps, self.uniform_noise("jitter", x.shape, rank))
        return self.logits(x, group_ids)

    def gating_losses(self, x, logits, scores, local_index, group_ids, rank):
        aux = losses.load_balancing_loss(scores, local_index, group_ids, self.num_groups, self.aux_loss_coeff)
        return stack_losses(aux, losses.z_loss(logits, self.z_loss_coeff), ops.zeros((), ms.float32))

    def score(self, x, token_ids, group_ids, training, rank=None):
        logits = self.gating_logits(x, group_ids, training, rank)
        scores, local_index, gate = gating_scores(logits, self.top_k, self.gating_mode, self.score_dtype)
        affinity = ops.gather_elements(logits, 1, local_index)
        return local_index, gate, affinity, None, self.gating_losses(x, logits, scores, local_index, group_ids, rank)

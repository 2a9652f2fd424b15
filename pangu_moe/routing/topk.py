"""Learned top-k router: Switch (K = 1) and GShard-style (K = 2), inside a level-1 group.

Megatron-Core's options map onto `moe.topk` (docs/architecture.md, Differences from Megatron-Core and
MindFormers): `score_function` softmax | sigmoid (moe_router_score_function), `normalize_gates` (the
renormalised top-k gates of Megatron's default post-softmax routing; at K = 1 the gate is the full softmax
probability, Megatron's moe_router_pre_softmax), `scaling` (moe_router_topk_scaling_factor) and
`seq_aux_coeff` (a sequence-level balance loss, `losses.sequence_balance_loss`).
"""

import mindspore as ms
from mindspore import ops

from pangu_moe.ops.gating import SOFTMAX, SOFTMAX_NORMALIZE, choose_top_k, gating_scores
from pangu_moe.routing import losses
from pangu_moe.routing.base import LearnedRouter, register, stack_losses

SCORE_FUNCTIONS = ("softmax", "sigmoid")
TINY = 1e-20  # keeps the sigmoid gates' sum away from 0, as Megatron-Core does


def multiplicative_jitter(x, eps, u=None):
    """Switch-style router-input noise: x * U(1 - eps, 1 + eps), element-wise. x [T, H] fp32; u: U[0, 1)
    noise [T, H] fp32 (`Router.uniform_noise`), or None to draw it here."""
    if u is None:
        u = ops.uniform(x.shape, ms.Tensor(0.0, ms.float32), ms.Tensor(1.0, ms.float32))
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


def sigmoid_scores(logits, top_k, normalize):
    """Sigmoid-then-top-k: scores s = sigmoid(logits), the K largest chosen (ties to the lower id), gate = s at
    the choice, divided by the K gates' sum when K > 1 and `normalize` (at K = 1 the raw sigmoid, so the LM
    loss trains the router).

    Args: logits [T, E_g] fp32; top_k K; normalize: python bool.
    Returns: scores [T, E_g] fp32, local_index [T, K] int32, gate [T, K] fp32.
    """
    scores = ops.sigmoid(logits)
    local_index = choose_top_k(logits, top_k)  # sigmoid is monotone: the top-k of the logits
    gate = ops.gather_elements(scores, 1, local_index)
    if normalize and top_k > 1:
        gate = gate / (gate.sum(-1, keepdims=True) + TINY)
    return scores, local_index, gate


@register
class TopKRouter(LearnedRouter):
    """Learned linear router, one [H, E_g] weight per group (stored as [G, H, E_g]).

    Per-group weights make the logits of a token bit-identical to those of the extracted domain
    sub-model, whose router is that group's slice.

    Args:
        hidden: H; num_experts: E; num_groups: G; top_k: K.
        aux_loss_coeff: alpha of `losses.load_balancing_loss` (f counts all K choices, divided by K,
            as Megatron does; GShard counts first choices only); z_loss_coeff: of `losses.z_loss`.
        jitter_eps: training-only `multiplicative_jitter`; 0 disables it.
        normalize: K > 1: renormalise the K gates (see `topk_scores`, `sigmoid_scores`).
        init_std: normal init std of the [G, H, E_g] weight.
        slot_policy: see `routing.slots`; the affinity of a choice is its logit.
        score_function: "softmax" or "sigmoid". The balance losses see the sigmoid scores normalised per token.
        seq_aux_coeff: alpha of `losses.sequence_balance_loss` (training only, added to the aux_loss slot);
            seq_len: S, the sequence length the routing group's tokens split into.
        scaling: multiplies every gate (after normalisation).
    """

    name = "topk"

    def __init__(self, hidden, num_experts, num_groups, top_k, aux_loss_coeff, z_loss_coeff,
                 jitter_eps=0.0, normalize=True, init_std=0.02, slot_policy="position", score_function="softmax",
                 seq_aux_coeff=0.0, seq_len=None, scaling=1.0):
        super().__init__(hidden, num_experts, num_groups, top_k, init_std, slot_policy)
        if score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"topk: score_function = {score_function!r}: must be one of {', '.join(SCORE_FUNCTIONS)}")
        if seq_aux_coeff > 0 and not seq_len:
            raise ValueError("topk: seq_aux_coeff > 0 needs seq_len")
        self.aux_loss_coeff = aux_loss_coeff
        self.z_loss_coeff = z_loss_coeff
        self.jitter_eps = jitter_eps
        self.normalize = normalize
        self.score_function, self.seq_aux_coeff, self.seq_len, self.scaling = (score_function, seq_aux_coeff,
                                                                              seq_len, scaling)

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        s = moe_cfg.topk
        return cls(model_cfg.hidden, moe_cfg.num_experts, moe_cfg.num_groups, moe_cfg.top_k, moe_cfg.aux_loss_coeff,
                   moe_cfg.z_loss_coeff, jitter_eps=s.jitter_eps, normalize=s.normalize_gates, init_std=s.init_std,
                   slot_policy=moe_cfg.slot_policy, score_function=s.score_function, seq_aux_coeff=s.seq_aux_coeff,
                   seq_len=model_cfg.seq_len, scaling=s.scaling)

    @property
    def softmax_mode(self):
        """The `ops.gating` softmax mode: renormalised when K > 1 and `normalize`."""
        return SOFTMAX_NORMALIZE if self.normalize and self.top_k > 1 else SOFTMAX

    @property
    def gating_mode(self):
        """moe_gating's mode for this router (`ops.gating`), or None when its scoring is not moe_gating's
        (sigmoid scores, a gate scaling, or a sequence loss, which the fused op does not compute)."""
        if self.score_function != "softmax" or self.scaling != 1.0 or self.seq_aux_coeff > 0:
            return None
        return self.softmax_mode

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
        aux = losses.load_balancing_loss(scores, local_index, group_ids, self.num_groups, self.aux_loss_coeff,
                                          self.sum_over_ranks)
        return stack_losses(aux, losses.z_loss(logits, self.z_loss_coeff), ops.zeros((), ms.float32))

    def score(self, x, token_ids, group_ids, training, rank=None):
        logits = self.gating_logits(x, group_ids, training, rank)
        if self.score_function == "sigmoid":
            scores, local_index, gate = sigmoid_scores(logits, self.top_k, self.normalize)
            scores = scores / (scores.sum(-1, keepdims=True) + TINY)  # what the balance losses average
        else:
            scores, local_index, gate = gating_scores(logits, self.top_k, self.softmax_mode)
        if self.scaling != 1.0:
            gate = gate * self.scaling
        affinity = ops.gather_elements(logits, 1, local_index)
        router_losses = self.gating_losses(x, logits, scores, local_index, group_ids, rank)
        if training and self.seq_aux_coeff > 0:
            zero = ops.zeros((), ms.float32)
            balance = losses.sequence_balance_loss(scores, local_index, self.seq_len, self.seq_aux_coeff)
            router_losses = router_losses + stack_losses(balance, zero, zero)
        return local_index, gate, affinity, None, router_losses

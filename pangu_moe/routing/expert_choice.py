"""Expert Choice routing (Zhou et al., arXiv 2202.09368): each expert picks its C best tokens.

Scores S = softmax(x W) over the experts of the token's group. Expert e of group g takes the C tokens of
group g with the highest S[:, e]; a token may get 0..E_g experts, and one chosen by none passes through
the residual only. Every expert is exactly full when its group has at least C tokens, so there is no
load-balancing loss (the z-loss still applies). C = ceil(T * capacity_factor / E): the capacity factor
is the average number of experts per token.

Semantics inside a causal LM: the choice of a token depends on the scores of every token of the routing
group, later positions included, so training sees information from the future and the layer is not
causal (Zhou et al. use it in encoders). Evaluation routes the same way on the evaluation batch, so
validation numbers are comparable between runs of this router but not a causal LM's true likelihood.

Outputs in the router contract with K = E (one column per global expert): expert_index[t, e] = e,
keep[t, e] = expert e chose token t, slot = the token's rank among e's picks, gate = S[t, e];
requested = keep, so demand equals kept and nothing counts as dropped.
"""
import mindspore as ms
from mindspore import ops

from pangu_moe.routing import losses
from pangu_moe.routing.base import LearnedRouter, global_probs, register, stack_losses


@register
class ExpertChoiceRouter(LearnedRouter):
    """Args: hidden H; num_experts E; num_groups G; z_loss_coeff; init_std of the [G, H, E_g] weight."""

    name = "expert_choice"
    max_top_k = 1  # moe.top_k; the routing tuple has K = E columns
    own_slots = True
    causal = False
    loss_terms = ("z",)  # every expert is exactly full: no load to balance

    def __init__(self, hidden, num_experts, num_groups, z_loss_coeff, init_std=0.02):
        super().__init__(hidden, num_experts, num_groups, num_experts, init_std)
        self.z_loss_coeff = z_loss_coeff

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        return cls(model_cfg.hidden, moe_cfg.num_experts, moe_cfg.num_groups, moe_cfg.z_loss_coeff,
                   moe_cfg.topk.init_std)

    def construct(self, x, token_ids, group_ids, capacity, training, rank=None):
        """As `Router.construct`, with K = E; see the module docstring for the meaning of each output."""
        num_tokens = x.shape[0]
        logits = self.logits(x, group_ids)
        scores = ops.softmax(logits, axis=-1)
        # Other groups' tokens score -1 for an expert, below any softmax probability, so they are never picked.
        outside = 1.0 - global_probs(ops.ones_like(scores), group_ids, self.num_groups)  # (T, E)
        per_expert = (global_probs(scores, group_ids, self.num_groups) - outside).T  # (E, T)
        picked, token = ops.topk(per_expert, min(capacity, num_tokens))  # (E, C)
        num_picks = token.shape[1]
        experts = ops.broadcast_to(ops.arange(self.num_experts, dtype=ms.int32).reshape(-1, 1), token.shape)
        where = ops.stack((token.astype(ms.int32), experts), axis=-1).reshape(-1, 2)  # (E*C, 2): (t, e)
        ranks = ops.broadcast_to(ops.arange(num_picks, dtype=ms.int32).reshape(1, -1), token.shape).reshape(-1)
        shape = (num_tokens, self.num_experts)
        slot = ops.scatter_nd(where, ranks, shape)
        keep = ops.scatter_nd(where, (picked > 0).astype(ms.int32).reshape(-1), shape) > 0
        expert_index = ops.broadcast_to(ops.arange(self.num_experts, dtype=ms.int32).reshape(1, -1), shape)
        gate = global_probs(scores, group_ids, self.num_groups)
        zero = ops.zeros((), ms.float32)
        return (expert_index, gate, keep, slot, keep, stack_losses(zero, losses.z_loss(logits, self.z_loss_coeff), zero),
                ops.zeros_like(gate))

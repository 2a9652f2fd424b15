"""Kool et al.'s skip estimator as an LM router (`moe.router: kool_skip`); the math is `routing.kool`.

Training: each token samples its expert e ~ pi(. | x) = softmax(x W) inside its group (Gumbel-max);
each expert keeps a uniformly random subset of at most C of its tokens (slot policy `random`); a kept
token's MoE output is the expert's output with no gate multiplication, and a skipped token's is 0 (the
residual carries it). Evaluation routes to the argmax, still ungated.

How this changes the layer inside an LM (against Switch):
- The router gets no gradient through a gate. It learns only from the REINFORCE term
  k w sg(l - b) log pi(e | x): `MoELayer` returns k w log pi(e | x) per token and the train step adds
  mean(sg(l_t - b) * score_t) - sg(...) (value 0, gradient intact), with l_t the token's own next-token
  loss and b an EMA of the batch's mean LM loss (`moe.kool_skip.baseline_decay`, kept on the model so
  checkpoints carry it). The token's own loss is a proxy credit: in a transformer a routing decision
  also changes later positions' losses through attention, which this credit ignores, so the router
  gradient is unbiased only for the per-token objective, not for the LM loss as a whole.
- The Horvitz-Thompson weight w = max(1, n_e / C) scales the *gradient* through a kept token's expert
  output (experts and everything upstream), not its value: the forward pass is the sampled layer itself,
  the backward pass is the skip estimator's importance-weighted gradient.
- The outputs are samples: training loss is noisier than Switch's at the same step.
"""
import mindspore as ms
from mindspore import ops

from pangu_moe.routing import losses
from pangu_moe.routing.base import LearnedRouter, stack_losses
from pangu_moe.routing.slots import assign_slots


def gumbel_noise(u):
    """Standard Gumbel noise from U[0, 1) noise u [shape] fp32, squeezed into [1e-12, 1 - 1e-7] first
    (eps-clipped, as `routing.kool.gumbel`)."""
    u = 1e-12 + u * (1.0 - 1e-7 - 1e-12)
    return -ops.log(-ops.log(u))


def horvitz_thompson(expert_index, keep, num_experts, capacity):
    """w = max(1, n_e / C) of each kept choice, 0 for skipped ones (`routing.kool.skip_weights`).

    Args: expert_index [T, 1] int32 global ids; keep [T, 1] bool; capacity C. Returns [T, 1] fp32.
    """
    counts = ops.unsorted_segment_sum(ops.ones(expert_index.shape, ms.float32).reshape(-1), expert_index.reshape(-1),
                                      num_experts)  # (E,)
    n_e = ops.gather(counts, expert_index.reshape(-1), 0).reshape(expert_index.shape)
    return ops.stop_gradient(ops.maximum(n_e / capacity, 1.0) * keep.astype(ms.float32))


class KoolSkipRouter(LearnedRouter):
    """Sampled top-1 router with skip-estimator weights. Args: hidden H; num_experts E; num_groups G;
    z_loss_coeff; init_std of the [G, H, E_g] weight."""

    reinforce = True

    def __init__(self, hidden, num_experts, num_groups, z_loss_coeff, init_std=0.02):
        super().__init__(hidden, num_experts, num_groups, 1, init_std, "random")
        self.z_loss_coeff = z_loss_coeff

    def noise_shapes(self, tokens):
        return {"gumbel": (tokens, self.experts_per_group), "slot_keys": (tokens, 1)}

    def construct(self, x, token_ids, group_ids, capacity, training, rank=None):
        """As `Router.construct`; gate is the HT weight (gradient scale only), log_prob = log pi(e | x)."""
        logits = self.logits(x, group_ids)
        log_probs = ops.log_softmax(logits, -1)
        ranking = log_probs
        if training:
            ranking = log_probs + gumbel_noise(self.uniform_noise("gumbel", logits.shape, rank))
        local_index = ops.argmax(ranking, -1).astype(ms.int32).reshape(-1, 1)  # (T, 1)
        expert_index = local_index + (group_ids * self.experts_per_group).reshape(-1, 1)
        ones = ops.ones(local_index.shape, ms.float32)
        keys = self.uniform_noise("slot_keys", local_index.shape, rank) if training else None
        slot, keep = assign_slots("random", expert_index, ones, ones, self.num_experts, capacity, training, None, keys)
        weight = horvitz_thompson(expert_index, keep, self.num_experts, capacity)
        log_prob = ops.gather_elements(log_probs, 1, local_index)
        zero = ops.zeros((), ms.float32)
        return (expert_index, weight, keep, slot, ops.ones_like(keep),
                stack_losses(zero, losses.z_loss(logits, self.z_loss_coeff), zero), log_prob)

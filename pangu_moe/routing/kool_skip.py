"""Kool et al.'s skip estimator as an LM router (`moe.router: kool_skip`); the math is `routing.kool`.

Training: each token samples its expert e ~ pi(. | x) = softmax(x W) inside its group (Gumbel-max);
each expert keeps a uniformly random subset of at most C of its tokens (slot policy `random`); a kept
token's MoE output is the expert's output with no gate multiplication, and a skipped token's is 0 (the
residual carries it). Evaluation routes to the argmax, still ungated.

How this changes the layer inside an LM (against Switch):
- The router gets no gradient through a gate. It learns only from the REINFORCE term
  k w sg(l - b) log pi(e | x): its `combine` returns the policy term k w log pi(e | x) per token and its
  `objective` adds mean(sg(l_t - b) * policy_term_t) - sg(...) (value 0, gradient intact) to the training
  loss, with l_t the token's own next-token loss and b an EMA of the batch's mean LM loss
  (`moe.kool_skip.baseline_decay`), a Parameter of the router so checkpoints carry it, updated inside the
  compiled step (`update_state`). The token's own loss is a proxy credit: in a transformer a routing decision
  also changes later positions' losses through attention, which this credit ignores, so the router
  gradient is unbiased only for the per-token objective, not for the LM loss as a whole.
- The Horvitz-Thompson weight w = max(1, n_e / C) scales the *gradient* through a kept token's expert
  output (experts and everything upstream), not its value: the forward pass is the sampled layer itself,
  the backward pass is the skip estimator's importance-weighted gradient.
- The outputs are samples: training loss is noisier than Switch's at the same step.
"""
import math

import mindspore as ms
from mindspore import Parameter, Tensor, ops

from pangu_moe.routing import losses
from pangu_moe.config import ConfigError
from pangu_moe.routing.base import LearnedRouter, register, stack_losses
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


@register
class KoolSkipRouter(LearnedRouter):
    """Sampled top-1 router with skip-estimator weights. Args: hidden H; num_experts E; num_groups G;
    z_loss_coeff; init_std of the [G, H, E_g] weight; vocab_size V (the baseline starts at log V, the loss
    of a uniform prediction); baseline_decay of the baseline's EMA."""

    name = "kool_skip"
    max_top_k = 1
    loss_terms = ("z",)  # its gradient is REINFORCE's, not a balance loss's

    def __init__(self, hidden, num_experts, num_groups, z_loss_coeff, init_std=0.02, vocab_size=256,
                 baseline_decay=0.9):
        super().__init__(hidden, num_experts, num_groups, 1, init_std, "random")
        self.z_loss_coeff = z_loss_coeff
        self.baseline_decay = baseline_decay
        self.reinforce_baseline = Parameter(Tensor(math.log(vocab_size), ms.float32), name="reinforce_baseline",
                                            requires_grad=False)

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        return cls(model_cfg.hidden, moe_cfg.num_experts, moe_cfg.num_groups, moe_cfg.z_loss_coeff,
                   moe_cfg.topk.init_std, model_cfg.vocab_size, moe_cfg.kool_skip.baseline_decay)

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if cfg.moe.slot_policy != "random":
            raise ConfigError(f"moe.slot_policy = {cfg.moe.slot_policy!r}: must be random for router {cls.name} "
                              f"(its importance weights assume a uniformly random kept subset)")

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

    def combine(self, dispatcher, expert_out, flat_index, gate, keep, log_prob):
        """The gate (the HT weight) scales the gradient only: forward sum(keep * out), backward gate * d out.
        policy_term [T] = sum over kept choices of sg(gate) * log pi(choice | x)."""
        y = dispatcher.combine(expert_out, flat_index, gate, keep)
        unweighted = dispatcher.combine(expert_out, flat_index, ops.ones_like(gate), keep)
        y = ops.stop_gradient(unweighted) + y - ops.stop_gradient(y)
        # stop_gradient: the bool keep mask must not collect gradients (MindSpore cannot add bool grads).
        return y, (ops.stop_gradient(keep.astype(ms.float32) * gate) * log_prob).sum(1)

    def objective(self, token_loss, policy_term):
        """The REINFORCE surrogate mean_t(sg(l_t - b) * policy_term_t) - sg(itself): value 0, gradient the
        REINFORCE term. token_loss, policy_term: [T_all] fp32."""
        advantage = ops.stop_gradient(token_loss - self.reinforce_baseline)
        surrogate = (advantage * policy_term).mean()
        return surrogate - ops.stop_gradient(surrogate)

    def update_state(self, lm_loss, applied):
        """b <- decay * b + (1 - decay) * (the batch's mean LM loss), on applied steps: b never depends on the
        batch it scores."""
        baseline = self.baseline_decay * self.reinforce_baseline + (1.0 - self.baseline_decay) * lm_loss
        ops.assign(self.reinforce_baseline, ops.where(applied, baseline, self.reinforce_baseline))

"""LocMoE (arXiv 2401.13920): parameter-free GrAP gating, top-1 by softmax probability, and a
locality loss that pulls tokens toward experts on their own node.

Choices where the paper is silent (our readings; docs/architecture.md, Routers); each is a constructor argument:
- epsilon_i of Eq. (2) is an optional learnable per-expert bias, initialised to 0 (`use_bias`).
- The expert is the argmax of the pre-ReLU logits w_i.x + b_i (with ReLU every logit can be 0 and the
  argmax arbitrary); the gate is softmax(ReLU(logits)) at that expert, as Eq. (3) writes it.
- GrAP has no parameters, so L_aux and L_loc train the representation x upstream (x is not detached)
  and the bias.
- D_c and D_l of the locality loss: see `losses.locality_loss` ("kl" = variant A, "mass" = variant B).
- Inside PanGu-Σ multi-level routing, GrAP splits H into E_g blocks (n = E_g in Eq. 4), the same for
  every group; only the biases differ by group. One group gives plain LocMoE.
- K > 1 is allowed (top-K of the pre-ReLU logits) though the paper uses K = 1.
The capacity lower bound (Theorem 1) is `capacity.capacity_lower_bound`, fed by
`capacity.estimate_delta` over `grap_cosines` of the routed experts; with moe.capacity_mode = locmoe_bound
the router proposes it as the training capacity (`propose_capacity`).
"""
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from pangu_moe import capacity as capacity_lib
from pangu_moe.config import ConfigError
from pangu_moe.ops.gating import GRAP, gating_scores
from pangu_moe.routing import losses
from pangu_moe.routing.base import Router, global_probs, register, stack_losses


def grap_weight(hidden, num_experts):
    """The GrAP matrix W [n, d] fp32 of Eq. (4): w_i = (n/d) on block i of size d/n, else 0 (numpy)."""
    if hidden % num_experts:
        raise ValueError(f"GrAP: hidden = {hidden} must be a multiple of the experts per group ({num_experts})")
    block = hidden // num_experts
    w = np.zeros((num_experts, hidden), np.float32)
    for i in range(num_experts):
        w[i, i * block:(i + 1) * block] = num_experts / hidden
    return w


def grap_logits(x, num_experts):
    """W x without the matrix: the mean of each of the n blocks of x. x [T, H] -> [T, n] fp32."""
    t, h = x.shape
    return x.astype(ms.float32).reshape(t, num_experts, h // num_experts).mean(-1)  # (T, n) <- (T, n, H/n)


def grap_cosines(x, num_experts):
    """cos(x_t, w_i) [T, n]: GrAP rows all have norm sqrt(n/d), so cos = (W x) / (sqrt(n/d) |x|)."""
    t, h = x.shape
    norm = ops.sqrt((x.astype(ms.float32) ** 2).sum(-1, keepdims=True)) * math.sqrt(num_experts / h)
    return grap_logits(x, num_experts) / ops.maximum(norm, Tensor(1e-12, ms.float32))


def check_grap(cfg, name):
    """`ConfigError` unless model.hidden splits into one GrAP block per expert of a group."""
    per_group = cfg.moe.num_experts // cfg.moe.num_groups
    if cfg.model.hidden % per_group:
        raise ConfigError(f"model.hidden = {cfg.model.hidden!r}: must be a multiple of the experts per group "
                          f"({per_group}) for router {name} (GrAP blocks)")


@register
class LocMoERouter(Router):
    """GrAP top-K router with load-balancing, z and locality losses.

    Args:
        hidden: H (a multiple of E_g); num_experts: E; num_groups: G; top_k: K.
        aux_loss_coeff, z_loss_coeff: as for `TopKRouter`.
        locality_coeff: mu; locality_variant: "kl" or "mass"; locality_smoothing: eps of "kl"
            (`losses.locality_loss`).
        local_mask: bool/float array [W, E] from `Topology.local_expert_mask` (W must divide T).
        use_bias: learnable per-group, per-expert bias epsilon_i.
        slot_policy: see `routing.slots`; the affinity of a choice is cos(x, w_i).
        delta_quantile: of the routed cosines taken as delta-hat by `propose_capacity`.
    """

    name = "locmoe"

    def __init__(self, hidden, num_experts, num_groups, top_k, aux_loss_coeff, z_loss_coeff, locality_coeff,
                 locality_variant, local_mask, use_bias=True, slot_policy="position", delta_quantile=0.0,
                 locality_smoothing=1e-3):
        super().__init__(num_experts, num_groups, top_k, slot_policy)
        grap_weight(hidden, self.experts_per_group)  # validates H % E_g
        self.hidden, self.delta_quantile = hidden, delta_quantile
        if locality_variant not in losses.LOCALITY_VARIANTS:
            raise ValueError(f"LocMoE: locality_variant = {locality_variant!r}: must be one of "
                             f"{', '.join(losses.LOCALITY_VARIANTS)}")
        self.bias = Parameter(Tensor(np.zeros((num_groups, self.experts_per_group), np.float32)), name="bias",
                              requires_grad=use_bias)
        self.local_mask = Tensor(np.asarray(local_mask, np.float32))
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.locality_coeff, self.locality_variant = locality_coeff, locality_variant
        self.locality_smoothing = locality_smoothing

    gating_mode = GRAP

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        s = moe_cfg.locmoe
        return cls(model_cfg.hidden, moe_cfg.num_experts, moe_cfg.num_groups, moe_cfg.top_k, moe_cfg.aux_loss_coeff,
                   moe_cfg.z_loss_coeff, s.locality_coeff, s.locality_variant, topology.local_expert_mask(), s.bias,
                   moe_cfg.slot_policy, moe_cfg.delta_quantile, s.locality_smoothing)

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        check_grap(cfg, cls.name)

    def propose_capacity(self, layer_input, static_capacity):
        """LocMoE's capacity lower bound (Theorem 1) at the delta-hat measured on this layer's input: the
        cosines between each token and its routed expert, their `delta_quantile` (see
        `capacity.estimate_delta`). Returns (ceil(ec_min), {"delta_hat": float, "capacity_lower_bound": float})."""
        delta = capacity_lib.estimate_delta(routed_cosines(self, *layer_input()), self.delta_quantile)
        bound = capacity_lib.capacity_lower_bound(delta, self.hidden, self.experts_per_group)
        return math.ceil(bound), {"delta_hat": delta, "capacity_lower_bound": bound}

    def gating_logits(self, x, group_ids, training, rank=None):
        """The pre-ReLU logits w_i.x + b_i [T, E_g] fp32: the choice is their argmax (see the module doc)."""
        return grap_logits(x, self.experts_per_group) + ops.gather(self.bias, group_ids, 0)

    def gating_losses(self, x, logits, scores, local_index, group_ids, rank):
        aux = losses.load_balancing_loss(scores, local_index, group_ids, self.num_groups, self.aux_loss_coeff,
                                          self.sum_over_ranks)
        locality = ops.zeros((), ms.float32)
        if self.locality_coeff > 0:
            probs = global_probs(scores, group_ids, self.num_groups)
            locality = losses.locality_loss(probs, losses.rank_mask(self.local_mask, rank), self.locality_variant,
                                            self.locality_coeff, self.kl_dtype, self.locality_smoothing)
        return stack_losses(aux, losses.z_loss(ops.relu(logits), self.z_loss_coeff), locality)

    def score(self, x, token_ids, group_ids, training, rank=None):
        pre_relu = self.gating_logits(x, group_ids, training)
        scores, local_index, gate = gating_scores(pre_relu, self.top_k, GRAP)
        affinity = ops.gather_elements(grap_cosines(x, self.experts_per_group), 1, local_index)
        return local_index, gate, affinity, None, self.gating_losses(x, pre_relu, scores, local_index, group_ids, rank)


def routed_cosines(router, x, token_ids, group_ids):
    """cos(x_t, w_{expert(t)}) of each token's first choice under `router` (host-side probe).

    Args: router: LocMoERouter; x [T, H]; token_ids, group_ids [T] int32.
    Returns: numpy float array [T].
    """
    expert_index = router(x, token_ids, group_ids, x.shape[0], False)[0].asnumpy()[:, 0]
    local = expert_index - group_ids.asnumpy() * router.experts_per_group
    cos = grap_cosines(x, router.experts_per_group).asnumpy()
    return cos[np.arange(len(local)), local]

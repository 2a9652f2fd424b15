"""LocMoE+ (arXiv 2406.00023, "Expert-Token Resonance"): cosine affinity routing, a TCR or ECR keep
rule, and a capacity re-estimated during training.

Choices where the paper is silent (our readings; docs/architecture.md, Routers); each is a setting of `moe.locmoe_plus`:
- Affinity delta_{t,i} = cos(x_t, w_i) with the fixed GrAP rows (block-diagonal W_aff); the entries are not
  trained (the paper gives them fixed values), so the router has no parameters: the aux and locality losses
  train x upstream, as in LocMoE.
- Candidates: each token's top-K experts by affinity. With `score_threshold` < 1 a token keeps only its first
  l choices, l the smallest with a gate sum >= threshold (the "score-sum threshold", per token over experts).
- Gate: softmax(delta / tau) at the chosen expert (LocMoE Eq. 3 with cosines), renormalised over the
  requested choices when K > 1. tau = `gate_temperature` (cosine softmax at tau = 1 is nearly uniform: with
  8 experts the gate is at most 0.28 and typically 0.14). With `gate: learned` 1 / tau is a trained scalar
  (log-parametrised, starting at 1 / gate_temperature), so the gate can sharpen as Switch's does; routing
  (the top-K of the cosines) does not depend on tau.
- Keep rule: TCR keeps an expert's first C candidates by position; ECR its C candidates of highest
  affinity. "hybrid" starts with TCR (better early, Theorem 5) and switches to ECR for good at
  `switch_step` or once the re-estimated capacity is at most `switch_ratio` of its ceiling (the experts
  have become discriminative: Corollary 6 (ii)), whichever comes first.
- Capacity (Corollary 6): the moe.capacity_factor capacity is the ceiling; a live capacity C_t, one per
  layer, limits the slots in training. Every `recompute_every` steps `before_step` runs `reestimate` on the
  batch about to be trained, pooled over the W routing groups: `capacity_need.corollary6_need` (only the
  tokens that requested expert i compete for its slots; the need counts the discriminative tokens to keep
  plus 2 q_i times the other candidates; per routing group), floor = max(min_capacity, ceil(LocMoE bound at
  the measured delta-hat)), then `capacity.dynamic_capacity` (optional EMA and non-increasing clamp, both
  off by default). Isotropic features need the ceiling; the need falls only once the discriminative tokens
  can be told from noise.
- Losses: Switch aux loss on softmax(delta / tau), z-loss on delta / tau, and LocMoE's locality loss.
With C >= T, K = 1 and TCR this routes exactly as LocMoE without bias (argmax of cosine = argmax of the
block means, Lemma 1); the gate differs only by the temperature and the cosine scaling.
"""
import math
from fractions import Fraction

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from pangu_moe import capacity as capacity_lib
from pangu_moe.capacity_need import corollary6_need
from pangu_moe.config import MULTI_PROCESS_BACKENDS, ConfigError
from pangu_moe.routing import losses
from pangu_moe.routing.base import Router, global_probs, register, stack_losses
from pangu_moe.routing.locmoe import check_grap, grap_cosines, grap_weight
from pangu_moe.routing.slots import position_slots, priority_slots

KEEP_RULES = ("tcr", "ecr", "hybrid")
NO_LIMIT = 2 ** 30


def switch_due(step, switch_step, switch_ratio, capacity=None, ceiling=None):
    """The hybrid keep rule's TCR -> ECR switch: at `switch_step` (0: never by step), or once a re-estimated
    capacity is at most `switch_ratio` of its ceiling (0: never by capacity; Corollary 6 (ii): the experts have
    become discriminative). The ratio is compared in exact rational arithmetic, so a capacity of exactly
    switch_ratio * ceiling switches."""
    by_step = switch_step > 0 and step >= switch_step
    by_capacity = capacity is not None and switch_ratio > 0 and capacity <= Fraction(str(switch_ratio)) * ceiling
    return by_step or by_capacity


def threshold_requests(gate, threshold):
    """Score-sum threshold: choice k of a token is requested while the gates before it sum below threshold.

    Args: gate [T, K] fp32 in descending order per token; threshold in (0, 1].
    Returns: [T, K] bool; the first choice is always requested.
    """
    before = ops.cumsum(gate, 1) - gate  # (T, K): sum of the earlier choices
    return before < threshold


@register
class LocMoEPlusRouter(Router):
    """Affinity router with TCR/ECR keep rules and a live (re-estimated) capacity.

    Args:
        hidden: H (a multiple of E_g); num_experts: E; num_groups: G; top_k: K (= l_max).
        aux_loss_coeff, z_loss_coeff: as for `TopKRouter`; locality_coeff, locality_variant, local_mask,
            locality_smoothing: as for `LocMoERouter`.
        keep_rule: "tcr", "ecr" or "hybrid"; switch_step: int (0 = never by step); switch_ratio: float
            (0 = never by concentration); score_threshold: float in (0, 1]; gate_temperature: tau;
            gate: "fixed" (tau as given) or "learned" (1 / tau trained from 1 / gate_temperature);
        keep_share: of `capacity_need.corollary6_need`; ema, non_increasing: of `capacity.dynamic_capacity`.
        recompute_every: steps between re-estimates (0: never); min_capacity: floor of the floor;
        num_ranks: W, the routing groups a training batch splits into (capacities are per group).
    """

    name = "locmoe_plus"
    own_slots = True

    def __init__(self, hidden, num_experts, num_groups, top_k, aux_loss_coeff, z_loss_coeff, locality_coeff,
                 locality_variant, local_mask, keep_rule="hybrid", switch_step=0, switch_ratio=0.6,
                 score_threshold=1.0, gate_temperature=1.0, keep_share=0.95, ema=0.0, non_increasing=False,
                 recompute_every=0, min_capacity=1, num_ranks=1, gate="fixed", locality_smoothing=1e-3):
        super().__init__(num_experts, num_groups, top_k, "affinity")
        grap_weight(hidden, self.experts_per_group)  # validates H % E_g
        if keep_rule not in KEEP_RULES:
            raise ValueError(f"LocMoE+: keep_rule = {keep_rule!r}: must be one of {', '.join(KEEP_RULES)}")
        self.hidden = hidden
        self.local_mask = Tensor(np.asarray(local_mask, np.float32))
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.locality_coeff, self.locality_variant = locality_coeff, locality_variant
        self.locality_smoothing = locality_smoothing
        self.keep_rule, self.switch_step, self.switch_ratio = keep_rule, switch_step, switch_ratio
        self.score_threshold, self.temperature = score_threshold, gate_temperature
        if gate not in ("fixed", "learned"):
            raise ValueError(f"LocMoE+: gate = {gate!r}: must be fixed or learned")
        # only a learned gate has the Parameter, so checkpoints of fixed-gate runs keep their contents
        self.log_inverse_temperature = Parameter(Tensor(-math.log(gate_temperature), ms.float32),
                                                 name="log_inverse_temperature") if gate == "learned" else None
        self.keep_share, self.ema, self.non_increasing = keep_share, ema, non_increasing
        self.recompute_every, self.min_capacity, self.num_ranks = recompute_every, min_capacity, num_ranks
        self.ceiling = None  # the static training capacity (`start`)
        # Router state updated between steps; Parameters, so checkpoints carry it. Updated with an eager
        # ops.assign: a compiled ms.jit step keeps reading the Parameter's memory, which set_data would
        # replace (the step would then keep the old value).
        self.capacity_limit = Parameter(Tensor(NO_LIMIT, ms.int32), name="live_capacity", requires_grad=False)
        self.use_ecr = Parameter(Tensor(int(keep_rule == "ecr"), ms.int32), name="use_ecr", requires_grad=False)

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        s = moe_cfg.locmoe_plus
        return cls(model_cfg.hidden, moe_cfg.num_experts, moe_cfg.num_groups, moe_cfg.top_k, moe_cfg.aux_loss_coeff,
                   moe_cfg.z_loss_coeff, s.locality_coeff, s.locality_variant, topology.local_expert_mask(),
                   keep_rule=s.keep_rule, switch_step=s.switch_step, switch_ratio=s.switch_ratio,
                   score_threshold=s.score_threshold, gate_temperature=s.gate_temperature,
                   keep_share=s.keep_share,
                   ema=s.ema, non_increasing=s.non_increasing, recompute_every=s.recompute_every,
                   min_capacity=moe_cfg.min_capacity, num_ranks=topology.world_size, gate=s.gate,
                   locality_smoothing=s.locality_smoothing)

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        check_grap(cfg, cls.name)
        every, dispatch = cfg.moe.locmoe_plus.recompute_every, cfg.parallel.dispatch
        if every and dispatch in MULTI_PROCESS_BACKENDS:
            raise ConfigError(f"moe.locmoe_plus.recompute_every = {every!r}: must be 0 with parallel.dispatch="
                              f"{dispatch} (the capacity re-estimate runs the whole model in one process; use "
                              f"simulated)")

    def score(self, x, token_ids, group_ids, training, rank=None):
        cosines = grap_cosines(x, self.experts_per_group)  # (T, E_g)
        if self.log_inverse_temperature is None:
            logits = cosines / self.temperature
        else:
            logits = cosines * ops.exp(self.log_inverse_temperature)
        scores = ops.softmax(logits, axis=-1)
        affinity, local_index = ops.topk(cosines, self.top_k)
        local_index = local_index.astype(ms.int32)
        gate = ops.gather_elements(scores, 1, local_index)
        requested = None
        if self.top_k > 1:
            if self.score_threshold < 1.0:
                requested = threshold_requests(gate, self.score_threshold)
                gate = gate * requested.astype(ms.float32)
            gate = gate / gate.sum(-1, keepdims=True)
        aux = losses.load_balancing_loss(scores, local_index, group_ids, self.num_groups, self.aux_loss_coeff,
                                          self.sum_over_ranks)
        locality = ops.zeros((), ms.float32)
        if self.locality_coeff > 0:
            probs = global_probs(scores, group_ids, self.num_groups)
            locality = losses.locality_loss(probs, losses.rank_mask(self.local_mask, rank), self.locality_variant,
                                            self.locality_coeff, self.kl_dtype, self.locality_smoothing)
        return local_index, gate, affinity, requested, stack_losses(aux, losses.z_loss(logits, self.z_loss_coeff),
                                                                     locality)

    def assign(self, expert_index, gate, affinity, requested, capacity, training, rank=None):
        """TCR (position) or ECR (affinity) slots; in training the live capacity masks slots beyond it."""
        if self.keep_rule == "tcr":
            slot, keep = position_slots(expert_index, self.num_experts, capacity, requested)
        elif self.keep_rule == "ecr":
            slot, keep = priority_slots(expert_index, affinity, self.num_experts, capacity, requested)
        else:
            tcr_slot, tcr_keep = position_slots(expert_index, self.num_experts, capacity, requested)
            ecr_slot, ecr_keep = priority_slots(expert_index, affinity, self.num_experts, capacity, requested)
            ecr = self.use_ecr > 0
            slot, keep = ops.select(ecr, ecr_slot, tcr_slot), ops.select(ecr, ecr_keep, tcr_keep)
        if training:
            keep = keep & (slot < self.capacity_limit)
        return slot, keep

    def reestimate(self, x, token_ids, group_ids, step):
        """Host-side capacity re-estimate on one batch (PyNative; between training steps, after `start`), under
        the router's ceiling, `min_capacity` and `num_ranks`.

        Args:
            x: [T, H] this layer's router input; token_ids, group_ids: [T] int32; step: the training step.
        Returns:
            dict: capacity (the new live C_t), need (the raw Corollary 6 need), q_max (the largest
            false-positive rate q_i, nan if no expert had candidates), floor, delta_hat, ecr (bool, the keep
            rule now in force).
        """
        expert_index = self(x, token_ids, group_ids, self.ceiling, False)[0].asnumpy()
        groups = group_ids.asnumpy()
        cosines = grap_cosines(x, self.experts_per_group).asnumpy()  # (T, E_g)
        first = expert_index[:, 0] - groups * self.experts_per_group  # (T,) local first choices
        found = corollary6_need(cosines, first, groups, self.experts_per_group, self.num_ranks, self.keep_share)
        delta_hat = capacity_lib.estimate_delta(cosines[np.arange(len(first)), first])
        bound = capacity_lib.capacity_lower_bound(delta_hat, self.hidden, self.experts_per_group)
        floor = min(self.ceiling, max(self.min_capacity, math.ceil(bound)))
        live = int(self.capacity_limit.asnumpy())
        previous = live if live < NO_LIMIT else None
        c = capacity_lib.dynamic_capacity(found["need"], floor, self.ceiling, previous, self.ema, self.non_increasing)
        ops.assign(self.capacity_limit, Tensor(c, ms.int32))
        self._switch_if_due(step, c)
        return {"capacity": c, "need": found["need"], "q_max": found["q_max"], "floor": floor, "delta_hat": delta_hat,
                "ecr": self.ecr_active()}

    def before_step(self, step, layer_input):
        """Switch a hybrid router to ECR when `switch_step` is reached, then, every `recompute_every` steps
        (from step 0, so the first re-estimate sees the initial features), re-estimate the capacity on the
        batch about to be trained (`reestimate`; it may switch TCR -> ECR). Returns its report or None."""
        self._switch_if_due(step)
        if not self.recompute_every or step % self.recompute_every:
            return None
        found = self.reestimate(*layer_input(), step)
        return {"capacity": found["capacity"], "need": found["need"], "q_max": round(found["q_max"], 4),
                "floor": found["floor"], "keep_rule": "ecr" if found["ecr"] else "tcr"}

    def live_capacity(self):
        return int(self.capacity_limit.asnumpy())

    def ecr_active(self):
        return bool(int(self.use_ecr.asnumpy()))

    def _switch_if_due(self, step, capacity=None):
        if self.keep_rule == "hybrid" and not self.ecr_active() and \
                switch_due(step, self.switch_step, self.switch_ratio, capacity, self.ceiling):
            ops.assign(self.use_ecr, Tensor(1, ms.int32))

    def start(self, static_capacity):
        """The static capacity is the ceiling; the live capacity starts there (a resumed run keeps its own)."""
        self.ceiling = static_capacity
        if int(self.capacity_limit.asnumpy()) == NO_LIMIT:
            ops.assign(self.capacity_limit, Tensor(static_capacity, ms.int32))

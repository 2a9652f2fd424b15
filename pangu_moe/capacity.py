"""Expert capacity, decided here and only here: pure host-side integer functions, evaluated before graph build.

`plan_capacities` turns the config and the routers' proposals into the training and evaluation
capacities of a run; `routing/slots.py` only assigns slots under the capacity it is given.
"""
import math
from collections import namedtuple
from fractions import Fraction


def expert_capacity(num_tokens, num_experts, top_k, factor, min_capacity=1):
    """Slots per expert per routing group: C = ceil(K * T * factor / E), at least `min_capacity`.

    Exact rational arithmetic on the decimal factor (1.1 means 11/10), so C never depends on float
    rounding. C is capped at T: no expert can receive a token twice.

    Args:
        num_tokens: T, tokens in the routing group.
        num_experts: E.
        top_k: K.
        factor: capacity factor (> 0).
        min_capacity: lower bound on C.
    Returns:
        int C in [1, T].
    """
    if num_tokens < 1 or num_experts < 1 or top_k < 1 or factor <= 0:
        raise ValueError(f"expert_capacity: need T, E, K >= 1 and factor > 0, got "
                         f"T={num_tokens}, E={num_experts}, K={top_k}, factor={factor}")
    slots = math.ceil(Fraction(str(factor)) * top_k * num_tokens / num_experts)
    return max(1, min(num_tokens, max(min_capacity, slots)))


LOWER_BOUND_FORMS = ("exact", "erfc", "exp")


def discriminative_probability(delta, hidden):
    """LocMoE Lemma 3: P(|cos(x, w)| >= delta) for x uniform on the unit sphere of R^hidden.

    Equals 1 - I_{delta^2}(1/2, (hidden - 1)/2), the regularized incomplete beta (two spherical caps).
    """
    from scipy.special import betaincc
    return float(betaincc(0.5, (hidden - 1) / 2, delta * delta))


def capacity_lower_bound(delta, hidden, num_experts, form="exact"):
    """LocMoE Theorem 1: the expected tokens an expert needs to receive one class-discriminative token.

    ec_min = 1 / (n * p_delta) with n = num_experts and p_delta from `discriminative_probability`
    ("exact"); the large-d forms are 1 / (n * erfc(z)) ("erfc") and exp(z^2) / n ("exp", a looser lower
    bound), with z^2 = delta^2 * d / (2 - delta^2).

    Args:
        delta: cosine threshold in [0, 1); hidden: d; num_experts: n (experts the token chooses among).
    Returns:
        float ec_min (not rounded).
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"capacity_lower_bound: delta = {delta}: must be in [0, 1)")
    if form not in LOWER_BOUND_FORMS:
        raise ValueError(f"capacity_lower_bound: form = {form!r}: must be one of {', '.join(LOWER_BOUND_FORMS)}")
    if form == "exact":
        return 1.0 / (num_experts * discriminative_probability(delta, hidden))
    z2 = delta * delta * hidden / (2.0 - delta * delta)
    if form == "erfc":
        from scipy.special import erfc
        return 1.0 / (num_experts * float(erfc(math.sqrt(z2))))
    return math.exp(z2) / num_experts


def estimate_delta(routed_cosines, quantile=0.0):
    """LocMoE's measured delta-hat: the cosine of the largest angle between a token and its expert.

    Our reading of "calculated through the maximal angular deviation" (the paper does not say how): the minimum of the
    routed cosines, or a low `quantile` of them for robustness; clipped to [0, 1).

    Args:
        routed_cosines: array of cos(x_t, w_{expert(t)}) over the measured tokens.
    """
    import numpy as np
    values = np.asarray(routed_cosines, dtype=np.float64).ravel()
    delta = float(values.min() if quantile == 0.0 else np.quantile(values, quantile))
    return min(max(delta, 0.0), np.nextafter(1.0, 0.0))


BUCKET_MULTIPLE = 8  # bucket sizes below the ceiling are multiples of 8 (whole SIMD rows of the buffers)


def capacity_ladder(ceiling):
    """The capacity buckets a run may compile its training step for, ascending: the static capacity
    (`ceiling`) and, below it, ceiling / sqrt(2)^k rounded up to a multiple of `BUCKET_MULTIPLE`, down to
    that multiple. At most 2 * log2(ceiling / 8) + 2 buckets, so the compilations of a run stay bounded.

    Args: ceiling: the static training capacity C (>= 1). Returns: list of ints ending with `ceiling`.
    """
    ladder, k = {ceiling}, 1
    while ceiling * 2 ** (-k / 2) > BUCKET_MULTIPLE:
        ladder.add(BUCKET_MULTIPLE * math.ceil(ceiling * 2 ** (-k / 2) / BUCKET_MULTIPLE))
        k += 1
    ladder.add(BUCKET_MULTIPLE)
    return sorted(c for c in ladder if c <= ceiling)


def capacity_bucket(capacity, ceiling):
    """The smallest bucket of `capacity_ladder(ceiling)` holding `capacity` slots (`ceiling` if none)."""
    return next((c for c in capacity_ladder(ceiling) if c >= capacity), ceiling)


def dropless_capacity(num_tokens):
    """C for slot policy none: no expert can receive more than T choices (a token picks an expert once)."""
    return num_tokens


CapacityPlan = namedtuple("CapacityPlan", "train eval proposals")


def plan_capacities(moe_cfg, group_tokens, routers, layer_inputs, log=None):
    """The run's capacities per routing group, decided once before the steps are compiled.

    - train: C = `expert_capacity` of moe.capacity_factor; with moe.capacity_mode = locmoe_bound the largest
      of the routers' proposals (`Router.propose_capacity`, one per MoE layer: one capacity serves every
      layer, as graph shapes are static), clamped to [min_capacity, T]. `min_capacity` is the safety floor:
      LocMoE's bound is tiny at small delta-hat and says nothing about load imbalance.
    - eval: `expert_capacity` of moe.eval_capacity_factor.
    - both T (`dropless_capacity`) with moe.slot_policy = none.
    A router may lower its capacity during training (`Router.live_capacity`); this plan is its ceiling, and
    the trainer then sizes the buffers by the `capacity_bucket` of the largest capacity in force.

    Args:
        moe_cfg: `config.MoEConfig`; group_tokens: T, tokens of one routing group;
        routers: the MoE layers' routers in order;
        layer_inputs: callable returning per layer (x [T_all, H], token_ids [T_all], group_ids [T_all]) of the
            step-0 batch under the initial weights, called only if a router asks (`Router.propose_capacity`).
        log: callable taking one line, or None.
    Returns:
        CapacityPlan(train int, eval int, proposals {key: [value per layer]} for summary.json).
    """
    m = moe_cfg
    train = expert_capacity(group_tokens, m.num_experts, m.top_k, m.capacity_factor, m.min_capacity)
    evaluation = expert_capacity(group_tokens, m.num_experts, m.top_k, m.eval_capacity_factor, m.min_capacity)
    proposals = {}
    if m.capacity_mode == "locmoe_bound":
        inputs = once(layer_inputs)
        found = [router.propose_capacity(lambda i=i: inputs()[i], train) for i, router in enumerate(routers)]
        train = min(group_tokens, max(m.min_capacity, max(c for c, _ in found)))
        for _, report in found:
            for key, value in report.items():
                proposals.setdefault(key, []).append(value)
        if log:
            shown = ", ".join(f"{key} {[round(v, 4) for v in values]}" for key, values in proposals.items())
            log(f"capacity proposed by the routers: {shown} -> C = {train}")
    if m.slot_policy == "none":
        train = evaluation = dropless_capacity(group_tokens)
    return CapacityPlan(train, evaluation, proposals)


def once(compute):
    """A callable that runs `compute()` on its first call and returns that value on every call."""
    cache = []

    def value():
        if not cache:
            cache.append(compute())
        return cache[0]
    return value


def dynamic_capacity(need, floor, ceiling, previous=None, ema=0.0, non_increasing=False):
    """LocMoE+ live capacity C_t from the measured need (our reading of the LocMoE+ paper's dynamic lower bound).

    C_t = clamp(need, floor, ceiling), optionally smoothed with the previous value
    (C_t = ceil(ema * previous + (1 - ema) * C_t)) and never above the previous value (`non_increasing`).
    The floor wins over everything: C_t >= floor always, and C_t <= ceiling when floor <= ceiling.

    Args:
        need: int from `capacity_need.corollary6_need`; floor: LocMoE's lower bound (already rounded up) or min
            capacity;
        ceiling: the capacity-factor capacity (static buffer size); previous: C_{t-1} or None.
    Returns:
        int C_t.
    """
    c = min(max(need, floor), ceiling)
    if previous is not None:
        if ema > 0:
            c = math.ceil(ema * previous + (1.0 - ema) * c)
        if non_increasing:
            c = min(c, previous)
    return max(c, floor)

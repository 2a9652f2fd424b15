"""LocMoE+'s capacity need (Corollary 6 of arXiv 2406.00023), estimated on one batch: host-side numpy.

What the paper states: an expert i must keep the class-discriminative token o_i of a sample; under expert
choice (ECR) with ℓ = 1 only the tokens that requested i (its candidates S_i) compete for its slots, and o_i
survives w.h.p. once C >= 2 * s * q_i, q_i = P(an irrelevant candidate r has δ_{r,i} >= δ_{o_i,i}). The
paper gives no estimator of q_i; this one is ours (docs/architecture.md, LocMoE+ capacity):

1. Null of an irrelevant token. A token carrying no class pattern has block cosines that behave like n iid
   draws. Its *top pivot* z = (top cosine - mean of the other n - 1) / their standard deviation is then
   scale free, so its null distribution is a fixed table (`null_pivots`, Monte Carlo with a fixed seed), and
   p_t = P_null(Z >= z_t) is the chance that an irrelevant token looks at least as committed as t.
2. Discriminative tokens of expert i: among S_i (tokens whose first choice is i), the share that is not null,
   1 - π0, with π0 from Storey's estimator (the p-values above λ = 1/2 are null ones) at its upper bound
   (two standard errors), so noise rarely claims a discriminative token: m_i = (1 - π0) |S_i|.
3. If m_i < 1, nothing distinguishes i's candidates from noise (Corollary 6 (i), near-isotropic features):
   q_i = 1 and need_i = 2 |S_i|, i.e. the ceiling after clamping.
4. Otherwise the capacity must keep `keep_share` of the m_i discriminative tokens: going down S_i by
   ascending p, the first p_(k) at which the expected discriminative tokens above it,
   k - π0 |S_i| p_(k), reach keep_share * m_i is q_i (an irrelevant candidate beats the weakest kept
   discriminative token with probability p_(k)), and need_i = keep_share * m_i + 2 q_i |S_i \\ D_i|.
5. The capacity is per routing group: need = ceil(max_i need_i / W) for a batch pooled over W ranks.

Calibration (tests/routing/test_capacity_need.py, at the study's shapes: LN-centred features, H = 128,
E = 8, the pooled 4096 tokens of 4 ranks): isotropic features give the ceiling; when a quarter of the tokens
carry a class pattern the need stays at the ceiling until top-1 accuracy on them is about 0.9, then falls
to the class tokens' own share. When every token carries a pattern the need follows the tokens correctly
routed to i (it rises with accuracy towards T/n): those are all discriminative, and none may be dropped.
When the discriminative tokens are too few to be told from noise (one per 256-token sample, the paper's
Assumption 1 at this batch size) the need stays at the ceiling: the estimator errs towards keeping.
"""
import functools
import math

import numpy as np

STOREY_LAMBDA = 0.5  # p-values above this are counted as null (Storey's pi0 estimator)
STOREY_Z = 2.0       # pi0 at its upper ~97.5% bound: a larger bound under-counts (and drops) discriminative
                     # tokens, a smaller one lets noise cut the capacity (tests/routing/test_capacity_need.py)
NULL_DRAWS = 1 << 17
NULL_SEED = 20240600  # the null table is a fixed function of n: every run and rank uses the same one


def top_pivots(affinity):
    """Each token's top pivot: (its largest affinity - mean of the others) / their sample std.

    Args: affinity: float array [T, n], n >= 3. Returns: float64 [T].
    """
    s = np.sort(np.asarray(affinity, np.float64), axis=1)
    others = s[:, :-1]
    spread = np.maximum(others.std(axis=1, ddof=1), np.finfo(np.float64).tiny)
    return (s[:, -1] - others.mean(axis=1)) / spread


@functools.lru_cache(maxsize=None)
def null_pivots(num_experts):
    """The sorted top pivots of `NULL_DRAWS` tokens with n iid standard normal affinities (a fixed table)."""
    draws = np.random.default_rng(NULL_SEED).standard_normal((NULL_DRAWS, num_experts))
    return np.sort(top_pivots(draws))


def null_survival(affinity):
    """p_t = P_null(pivot >= pivot_t): how likely an irrelevant token looks as committed to its top choice.

    Args: affinity: float array [T, n], n >= 3. Returns: float64 [T] in [0, 1].
    """
    table = null_pivots(affinity.shape[1])
    return 1.0 - np.searchsorted(table, top_pivots(affinity), side="left") / len(table)


def expert_need(survival, keep_share):
    """One expert's need from its candidates' null survivals (steps 2-4 of the module docstring).

    Args: survival: float array [|S_i|] of p_t; keep_share: share of the discriminative tokens to keep.
    Returns: (need_i float, q_i float, m_i float), (0, nan, 0) for an expert without candidates.
    """
    n = len(survival)
    if n == 0:
        return 0.0, math.nan, 0.0
    p = np.sort(survival)
    above = float(np.mean(p > STOREY_LAMBDA))
    pi0 = min(1.0, (above + STOREY_Z * math.sqrt(above * (1.0 - above) / n)) / (1.0 - STOREY_LAMBDA))
    m = (1.0 - pi0) * n
    if m < 1.0:
        return 2.0 * n, 1.0, 0.0
    found = np.arange(1, n + 1) - pi0 * n * p >= keep_share * m  # (n,) expected discriminative above p_(k)
    q = float(p[int(np.argmax(found))] if found.any() else 1.0)
    return keep_share * m + 2.0 * q * (n - m), q, m


def corollary6_need(affinity, first_choice, group_ids, experts_per_group, num_ranks, keep_share=0.95):
    """The LocMoE+ capacity need of one batch pooled over `num_ranks` routing groups.

    Args:
        affinity: float array [T, E_g], δ_{t,i} over the token's own level-1 group (cosines for LocMoE+);
        first_choice: int array [T] of local expert ids in [0, E_g) (the requested expert, ℓ = 1);
        group_ids: int array [T]; experts_per_group: E_g; num_ranks: W, the routing groups the batch holds;
        keep_share: in (0, 1], the share of each expert's discriminative tokens the capacity must keep.
    Returns:
        dict: need (int, slots per expert per routing group), q_max (the largest q_i, nan if no expert had
        candidates), discriminative (the estimated discriminative tokens of the batch, sum of m_i).
        With E_g < 3 nothing can be told from noise: need = the most candidates of an expert, doubled.
    """
    affinity = np.asarray(affinity, np.float64)
    first_choice, group_ids = np.asarray(first_choice), np.asarray(group_ids)
    if experts_per_group < 3:
        load = np.bincount(group_ids * experts_per_group + first_choice)
        return {"need": math.ceil(2 * load.max() / num_ranks), "q_max": 1.0, "discriminative": 0.0}
    survival = null_survival(affinity)
    needs, rates, found = [], [], 0.0
    for g in np.unique(group_ids):
        for i in range(experts_per_group):
            need_i, q_i, m_i = expert_need(survival[(group_ids == g) & (first_choice == i)], keep_share)
            needs.append(need_i)
            rates.append(q_i)
            found += m_i
    q_max = float(np.nanmax(rates)) if np.isfinite(rates).any() else math.nan
    return {"need": math.ceil(max(needs) / num_ranks - 1e-9), "q_max": q_max, "discriminative": found}


def planted_features(separation, share, seed, tokens=4096, hidden=128, experts=8):
    """Calibration inputs: LN-centred router inputs (LayerNorm without gain) of which a `share` carry a class
    pattern, `separation` along the GrAP block of their class (top-1 accuracy on them ~0.13, 0.40, 0.70, 0.92,
    0.99 at separation 0..4 for H = 128, E = 8); the rest are isotropic.

    Returns: (x float32 [tokens, hidden], classes int [tokens], planted bool [tokens]).
    """
    rng = np.random.default_rng(seed)
    classes, x = rng.integers(0, experts, tokens), rng.standard_normal((tokens, hidden))
    planted, block = rng.random(tokens) < share, hidden // experts
    for c in range(experts):
        x[planted & (classes == c), c * block:(c + 1) * block] += separation / math.sqrt(block)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    return x.astype(np.float32), classes, planted

"""Kool, Maddison & Mnih (arXiv 2109.11817): unbiased gradient estimators for routing under capacity.

Host-side (numpy) building blocks, used by the toy study (`studies/kool.py`) and checked by exact
enumeration in the tests. The paper's sections 2-5 were not retrievable; the estimators are those of
the Gumbel-matching and sequential samplers of the paper's §2.3-2.4, which meet every property the abstract states and are unbiased by
construction (the tests enumerate to prove it on tiny problems).

Routing is a random variable: datapoint i is sent to a *sampled* expert e_i ~ pi(. | x_i), and the layer's
output is that expert's output, with no gate multiplication. The objective is
J = (1/N) sum_i E_{e ~ pi(.|x_i)} [l_i(e)].

- Skip estimator: sample e_i; in a uniformly random order keep datapoint i iff fewer than C earlier ones
  chose e_i (= per expert, a uniformly random subset of min(n_e, C)); weight the kept ones by the
  Horvitz-Thompson factor w_i = max(1, n_{e_i} / C). The REINFORCE surrogate
  (1/N) sum_i k_i w_i [l_i(e_i) + sg(l_i(e_i) - b) log pi(e_i|x_i)] has gradient E = grad J, with a
  baseline b independent of e_i and of the order (an EMA of past batch losses).
- Balanced estimator: replicate each expert's column C times (N = E*C), add i.i.d. Gumbel noise to
  log pi and solve the maximum-weight perfect matching (Gumbel-Matching extended to capacities): every
  expert gets exactly C datapoints. B1 is the score function in noise space, unbiased for the balanced
  model's own objective J_bal; B2 is a sequential balanced sampler with an exact pmf (a fallback, not
  the paper's matching).

Semantics inside an LM: the per-datapoint loss l_i(e) of a token is not separable in a transformer
(attention mixes positions, later layers see every routing decision). `routing/kool_skip.py` runs the
skip estimator in the LM with each token's own LM loss as its credit, a proxy. The balanced estimator
would need a host-side perfect matching over B*S replicated columns per layer and step (O(T^3) with
T = 4096 in the demo), so it runs on the toy task only, where l_i(e) is exact, as does BASE.
"""
import itertools
import math

import numpy as np


def softmax(logits):
    """Row softmax of a float array [..., E]."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def keep_from_order(experts, order, capacity):
    """Skip rule for one processing order: datapoint i is kept iff fewer than C earlier ones chose e_i.

    Args: experts [N] int; order [N] permutation of range(N); capacity C.
    Returns: bool [N].
    """
    keep = np.zeros(len(experts), bool)
    seen = {}
    for i in order:
        seen[experts[i]] = seen.get(experts[i], 0) + 1
        keep[i] = seen[experts[i]] <= capacity
    return keep


def skip_keep(experts, capacity, rng):
    """Skip rule with i.i.d. uniform keys (a uniformly random order): bool [N]."""
    return keep_from_order(experts, rng.permutation(len(experts)), capacity)


def skip_weights(experts, keep, capacity, weighted=True):
    """k_i * w_i with w_i = max(1, n_{e_i} / C) (the Horvitz-Thompson weight); `weighted=False` gives the
    biased plain skip (w = 1). Args: experts [N] int; keep [N] bool. Returns float [N]."""
    counts = np.bincount(experts, minlength=experts.max() + 1)[experts]
    weights = np.maximum(1.0, counts / capacity) if weighted else np.ones(len(experts))
    return keep * weights


def gumbel(shape, rng, eps=1e-12):
    """Standard Gumbel noise -log(-log U), U ~ U(eps, 1 - eps)."""
    return -np.log(-np.log(rng.uniform(eps, 1.0 - eps, shape)))


def max_matching(weights):
    """Maximum-weight perfect matching of a square [N, N] matrix: column index of each row (int [N])."""
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(weights, maximize=True)
    out = np.empty(len(rows), np.int64)
    out[rows] = cols
    return out


def gumbel_matching(log_probs, capacity, rng, solver=max_matching):
    """Balanced sampler: each expert column replicated C times, Gumbel noise, perfect matching.

    Args:
        log_probs: [N, E] with N = E * C (pad with dummy rows otherwise); capacity: C; rng: numpy Generator.
    Returns:
        assignment [N] int (expert of each datapoint; each expert exactly C times) and the noise
        score u [N, E] = sum over the expert's C slots of (1 - exp(-G)), for the B1 estimator.
    """
    n, e = log_probs.shape
    if n != e * capacity:
        raise ValueError(f"gumbel_matching: N = {n} must equal E * C = {e} * {capacity}")
    noise = gumbel((n, n), rng)
    weights = np.repeat(log_probs, capacity, axis=1) + noise  # (N, E*C): column (e, c) at e*C + c
    assignment = solver(weights) // capacity
    score = (1.0 - np.exp(-noise)).reshape(n, e, capacity).sum(-1)  # (N, E) <- (N, E, C)
    return assignment, score


def brute_force_matching(weights):
    """Exhaustive maximum-weight perfect matching (tiny N only; a cross-check of `max_matching`)."""
    n = weights.shape[0]
    best, best_value = None, -np.inf
    for perm in itertools.permutations(range(n)):
        value = weights[np.arange(n), perm].sum()
        if value > best_value:
            best, best_value = np.array(perm), value
    return best


def b1_logit_gradient(score, probs, advantage):
    """B1 score-function term for per-datapoint softmax logits h (S = log softmax(h)).

    d/dh_ij of sum_{i,e} S_ie u_ie = u_ij - pi_ij * sum_e u_ie.

    Args: score u [N, E]; probs pi [N, E]; advantage F - b (scalar).
    Returns: [N, E] estimate of dJ_bal/dh (without the pathwise expert term).
    """
    return advantage * (score - probs * score.sum(1, keepdims=True))


def sequential_balanced(probs, capacity, order, rng):
    """B2: datapoints in `order` each take Gumbel-max over the experts that still have room.

    Args: probs [N, E]; capacity C (N <= E*C); order [N] permutation; rng.
    Returns: assignment [N] int and dlogq [N, E]: d log q(a | order) / d logits for softmax logits.
    """
    n, e = probs.shape
    room = np.full(e, capacity)
    assignment = np.empty(n, np.int64)
    dlogq = np.zeros((n, e))
    for i in order:
        avail = room > 0
        p = np.where(avail, probs[i], 0.0)
        q = p / p.sum()
        choice = int(np.argmax(np.where(avail, np.log(np.maximum(p, 1e-300)) + gumbel(e, rng), -np.inf)))
        assignment[i] = choice
        room[choice] -= 1
        # log q_i = h_ia - log sum_{avail} exp(h_ie): gradient onehot(a) - q (zero outside avail).
        dlogq[i] = -q
        dlogq[i, choice] += 1.0
    return assignment, dlogq


def capacity_for(num, num_experts, factor):
    """C = ceil(N / E * factor) as the toy uses it."""
    return max(1, math.ceil(num / num_experts * factor - 1e-9))

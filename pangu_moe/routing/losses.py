"""Router losses as pure functions: each returns a weighted fp32 scalar; nothing is kept in globals."""
import mindspore as ms
from mindspore import ops


def load_balancing_loss(scores, local_index, group_ids, num_groups, coeff, sum_over_ranks=None):
    """Switch/GShard load-balancing loss, per level-1 group, weighted by the group's token share.

    For one group (G = 1) this is exactly alpha * E * sum_i f_i * P_i with
    f_i = (choices of expert i, before dropping) / (K * T) and P_i = mean_t scores[t, i].
    With G groups each group contributes (T_g / T) * alpha * E_g * sum_{i in g} f_i^g * P_i^g, with f and P
    taken over the group's own T_g tokens, so a balanced group scores alpha whatever the domain mix.
    Gradients flow through P only (f is a count).

    `sum_over_ranks` (moe.aux_scope = global with one rank per process) sums a count tensor over the W ranks.
    f then counts every rank's choices while P stays this rank's: the rank's loss is the per-rank surrogate
    alpha * E_g * sum_i f_i^all * P_i^rank, whose mean over ranks (the data-parallel mean of the trainer) is
    the loss of all ranks' tokens at once in value and gradient, because P^all is the mean of the P^rank.

    Args:
        scores: [T, E_g] fp32, the score function's output over the token's own group.
        local_index: [T, K] int32 expert ids inside the token's group (pre-drop choices).
        group_ids: [T] int32.
        num_groups: G (python int).
        coeff: alpha (python float).
        sum_over_ranks: None, or a cell [G, E_g + 1] fp32 -> the same summed over ranks.
    Returns:
        fp32 scalar: alpha at perfect balance, alpha * E_g when each group collapses onto one expert.
    """
    num_tokens, experts_per_group = scores.shape
    top_k = local_index.shape[1]
    one = ms.Tensor(1, ms.float32)
    zero = ms.Tensor(0, ms.float32)
    group_onehot = ops.one_hot(group_ids, num_groups, one, zero)  # (T, G)
    prob_sum = ops.matmul(group_onehot.T, scores)  # (G, E_g): sum of scores per expert over the group's tokens
    chosen = ops.one_hot(local_index, experts_per_group, one, zero).sum(1)  # (T, E_g) <- (T, K, E_g)
    choices = ops.matmul(group_onehot.T, chosen)  # (G, E_g)
    group_tokens = group_onehot.sum(0).reshape(num_groups, 1)  # (G, 1)
    if sum_over_ranks is not None:
        counts = sum_over_ranks(ops.concat((choices, group_tokens), 1))  # (G, E_g + 1), one collective
        choices, group_tokens = counts[:, :experts_per_group], counts[:, experts_per_group:]
    group_tokens = ops.maximum(group_tokens, one)
    per_group = (choices * prob_sum).sum(1, keepdims=True) / (group_tokens * top_k)
    return coeff * experts_per_group * per_group.sum() / num_tokens


def z_loss(logits, coeff):
    """ST-MoE router z-loss: coeff * mean_t logsumexp(logits[t])^2.

    Args:
        logits: [T, E_g] fp32.
    Returns:
        fp32 scalar.
    """
    lse = ops.logsumexp(logits, -1)
    return coeff * (lse * lse).mean()


def sequence_balance_loss(scores, local_index, seq_len, coeff):
    """DeepSeek-V3 complementary sequence-wise balance loss (also the top-k router's `seq_aux_coeff`).

    alpha * mean over sequences of sum_i f_i P_i, with f_i = E_g / (K * S) * (choices of expert i in the
    sequence) and P_i the mean over the sequence of the scores normalised per token.

    Args:
        scores: [T, E_g] fp32 non-negative scores (sigmoid or softmax); local_index: [T, K] int32; seq_len: S
            (T = B*S, whole sequences); coeff: alpha.
    Returns:
        fp32 scalar: alpha at perfect per-sequence balance.
    """
    num_tokens, experts_per_group = scores.shape
    top_k = local_index.shape[1]
    normalised = scores / scores.sum(-1, keepdims=True)
    prob = normalised.reshape(-1, seq_len, experts_per_group).mean(1)  # (B, E_g) <- (B, S, E_g)
    one, zero = ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32)
    chosen = ops.one_hot(local_index, experts_per_group, one, zero).sum(1)  # (T, E_g) <- (T, K, E_g)
    frac = chosen.reshape(-1, seq_len, experts_per_group).sum(1) * (experts_per_group / (top_k * seq_len))  # (B, E_g)
    return coeff * (frac * prob).sum(1).mean()


LOCALITY_VARIANTS = ("kl", "mass")


def locality_loss(probs, local_mask, variant, coeff, exact, smoothing=1e-3):
    """LocMoE locality loss mu * L_loc, averaged over ranks.

    Tokens belong to ranks in contiguous blocks (rank r holds tokens [r*T/W, (r+1)*T/W)). Per rank r on
    node nu(r), D_c = mean over its tokens of the router probabilities [E], L(nu) = experts hosted on
    nu(r). Our readings of the paper's unspecified D_c / D_l (our reading):
    - "kl" (variant A): KL(D_c || D~_l), D_l uniform over L(nu), smoothed D~_l = (1-eps) D_l + eps/E.
      Zero-measure experts contribute 0; minimal (0) at D_c = D~_l.
    - "mass" (variant B): -log sum_{i in L(nu)} D_c(i); zero iff all mass is on local experts.
    Ranks whose node hosts no expert contribute 0 (the paper notes locality loses efficacy there).

    Args:
        probs: [T, E] fp32 router probabilities over all experts (0 outside the token's group).
        local_mask: [W, E] fp32, 1 where expert e is on rank r's node (`Topology.local_expert_mask`).
        variant: "kl" or "mass"; coeff: mu; smoothing: eps of variant "kl".
        exact: the dtype of the KL's log-and-sum (`precision.kl_dtype()`).
    Returns:
        fp32 scalar.
    """
    num_ranks, num_experts = local_mask.shape
    current = probs.reshape(num_ranks, -1, num_experts).mean(1)  # (W, E) <- (W, T/W, E)
    local_count = local_mask.sum(1)  # (W,)
    hosts = (local_count > 0).astype(ms.float32)
    tiny = ms.Tensor(1e-30, ms.float32)
    if variant == "kl":
        target = local_mask / ops.maximum(local_count, 1.0).reshape(-1, 1)
        target = (1.0 - smoothing) * target + smoothing / num_experts
        # `exact` (fp64 on CPU, `precision.kl_dtype`) on these [W, E] values: in fp32 a resumed run's locality
        # loss differed from the uninterrupted one's in the last digits; E values per rank cost nothing.
        wide = current.astype(exact)
        log_ratio = ops.log(ops.maximum(wide, tiny.astype(exact))) - ops.log(target.astype(exact))
        per_rank = (wide * log_ratio).sum(1).astype(ms.float32)
    else:
        per_rank = -ops.log(ops.maximum((current * local_mask).sum(1), tiny))
    return coeff * (per_rank * hosts).mean()


def rank_mask(local_mask, rank):
    """The rows of `local_mask` [W, E] for tokens of one source rank (a python int) -> [1, E], or all W
    rows for rank None (tokens of every rank in rank-major blocks)."""
    return local_mask if rank is None else local_mask[rank:rank + 1]

"""Router losses as pure functions: each returns a weighted fp32 scalar; nothing is kept in globals."""
import mindspore as ms
from mindspore import ops


def load_balancing_loss(scores, local_index, group_ids, num_groups, coeff):
    """Switch/GShard load-balancing loss, per level-1 group, weighted by the group's token share.

    For one group (G = 1) this is exactly alpha * E * sum_i f_i * P_i with
    f_i = (choices of expert i, before dropping) / (K * T) and P_i = mean_t scores[t, i].
    With G groups each group contributes (T_g / T) * alpha * E_g * sum_{i in g} f_i^g * P_i^g, with f and P
    taken over the group's own T_g tokens, so a balanced group scores alpha whatever the domain mix.
    Gradients flow through P only (f is a count).

    Args:
        scores: [T, E_g] fp32, the score function's output over the token's own group.
        local_index: [T, K] int32 expert ids inside the token's group (pre-drop choices).
        group_ids: [T] int32.
        num_groups: G (python int).
        coeff: alpha (python float).
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
    group_tokens = ops.maximum(group_onehot.sum(0), one).reshape(num_groups, 1)  # (G, 1)
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

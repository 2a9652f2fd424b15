"""BASE layers (Lewis et al., arXiv 2103.16716): balanced assignment in training, argmax at test.

Affinity s = x . w_e (per level-1 group), with no gradient. In training each group's T_g tokens are
assigned by the exact solution of max sum_t s[t, a_t] subject to at most ceil(T_g / E_g) tokens per
expert (`balanced_assignment` below, on the host through a pyfunc custom op: CPU only). At
test time each token takes its argmax. The layer output is sigmoid(s[t, a_t]) * expert(x_t), the
router's only gradient path; there is no auxiliary loss and nothing is dropped while the buffer C is
at least ceil(T_g / E_g) (C from the capacity factor, so keep moe.capacity_factor >= 1 and, with
several groups, a mixture that balances the groups).
"""
import numpy as np
import mindspore as ms
from mindspore import ops

from pangu_moe.routing import losses
from pangu_moe.routing.base import LearnedRouter, register, stack_losses


def balanced_assignment(affinity, capacity):
    """BASE layers' training assignment: maximise the total affinity with at most C datapoints per expert.

    Exact either way: a linear assignment over C-replicated columns for small N, the transportation
    linear program (HiGHS dual simplex; its vertex solutions are integral) for large N, where the
    replicated square matrix would be too big.

    Args: affinity [N, E] (no gradient); capacity C with N <= E*C.
    Returns: assignment [N] int.
    """
    n, e = affinity.shape
    if n > e * capacity:
        raise ValueError(f"balanced_assignment: N = {n} exceeds E * C = {e * capacity}")
    if n > 256:
        return _transport_assignment(affinity, capacity)
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(np.repeat(affinity, capacity, axis=1), maximize=True)
    out = np.empty(n, np.int64)
    out[rows] = cols // capacity
    return out


def _transport_assignment(affinity, capacity):
    from scipy.optimize import linprog
    from scipy.sparse import eye, kron
    n, e = affinity.shape
    once = kron(eye(n), np.ones((1, e)), format="csr")  # (N, N*E): each datapoint assigned once
    room = kron(np.ones((1, n)), eye(e), format="csr")  # (E, N*E): at most C per expert
    result = linprog(-np.asarray(affinity, np.float64).ravel(), A_ub=room, b_ub=np.full(e, capacity), A_eq=once,
                     b_eq=np.ones(n), bounds=(0, 1), method="highs-ds")
    if result.status != 0:
        raise RuntimeError(f"balanced_assignment: the transportation LP failed ({result.message})")
    return result.x.reshape(n, e).argmax(1)


def group_balanced_assignment(affinity, group_ids):
    """Host side: per group, the balanced assignment of its tokens (numpy in, int32 [T] local ids out)."""
    out = np.zeros(len(group_ids), np.int32)
    experts = affinity.shape[1]
    for g in np.unique(group_ids):
        rows = np.flatnonzero(group_ids == g)
        out[rows] = balanced_assignment(affinity[rows], -(-len(rows) // experts))
    return out


def _no_gradient(affinity, groups, out, dout):
    # A def, not a lambda: graph mode parses the bprop from its source.
    return ops.zeros_like(affinity), ops.zeros_like(groups)


_ASSIGN = ops.Custom(group_balanced_assignment, out_shape=lambda affinity, groups: groups,
                     out_dtype=lambda affinity, groups: ms.int32, func_type="pyfunc", bprop=_no_gradient)


@register
class BASERouter(LearnedRouter):
    """Args: hidden H; num_experts E; num_groups G; z_loss_coeff; init_std of the [G, H, E_g] centroids."""

    name = "base"
    max_top_k = 1
    own_slots = True
    loss_terms = ("z",)  # balanced by the assignment

    def __init__(self, hidden, num_experts, num_groups, z_loss_coeff, init_std=0.02):
        super().__init__(hidden, num_experts, num_groups, 1, init_std)
        self.z_loss_coeff = z_loss_coeff

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        return cls(model_cfg.hidden, moe_cfg.num_experts, moe_cfg.num_groups, moe_cfg.z_loss_coeff,
                   moe_cfg.topk.init_std)

    def score(self, x, token_ids, group_ids, training, rank=None):
        logits = self.logits(x, group_ids)
        if training:
            local_index = _ASSIGN(ops.stop_gradient(logits), group_ids).reshape(-1, 1)  # (T, 1)
        else:
            local_index = ops.argmax(logits, -1).astype(ms.int32).reshape(-1, 1)
        chosen = ops.gather_elements(logits, 1, local_index)
        zero = ops.zeros((), ms.float32)
        return local_index, ops.sigmoid(chosen), chosen, None, stack_losses(zero, losses.z_loss(logits, self.z_loss_coeff),
                                                                           zero)

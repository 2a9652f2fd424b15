"""BASE layers (Lewis et al., arXiv 2103.16716): balanced assignment in training, argmax at test.

Affinity s = x . w_e (per level-1 group), with no gradient. In training each group's T_g tokens are
assigned by the exact solution of max sum_t s[t, a_t] subject to at most ceil(T_g / E_g) tokens per
expert (`routing.kool.balanced_assignment`, on the host through a pyfunc custom op: CPU only). At
test time each token takes its argmax. The layer output is sigmoid(s[t, a_t]) * expert(x_t), the
router's only gradient path; there is no auxiliary loss and nothing is dropped while the buffer C is
at least ceil(T_g / E_g) (C from the capacity factor, so keep moe.capacity_factor >= 1 and, with
several groups, a mixture that balances the groups).
"""
import numpy as np
import mindspore as ms
from mindspore import ops

from pangu_moe.routing import kool, losses
from pangu_moe.routing.base import LearnedRouter, stack_losses


def group_balanced_assignment(affinity, group_ids):
    """Host side: per group, the balanced assignment of its tokens (numpy in, int32 [T] local ids out)."""
    out = np.zeros(len(group_ids), np.int32)
    experts = affinity.shape[1]
    for g in np.unique(group_ids):
        rows = np.flatnonzero(group_ids == g)
        out[rows] = kool.balanced_assignment(affinity[rows], -(-len(rows) // experts))
    return out


def _no_gradient(affinity, groups, out, dout):
    # A def, not a lambda: graph mode parses the bprop from its source.
    return ops.zeros_like(affinity), ops.zeros_like(groups)


_ASSIGN = ops.Custom(group_balanced_assignment, out_shape=lambda affinity, groups: groups,
                     out_dtype=lambda affinity, groups: ms.int32, func_type="pyfunc", bprop=_no_gradient)


class BASERouter(LearnedRouter):
    """Args: hidden H; num_experts E; num_groups G; z_loss_coeff; init_std of the [G, H, E_g] centroids."""

    def __init__(self, hidden, num_experts, num_groups, z_loss_coeff, init_std=0.02):
        super().__init__(hidden, num_experts, num_groups, 1, init_std)
        self.z_loss_coeff = z_loss_coeff

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

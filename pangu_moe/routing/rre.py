"""PanGu-Σ Random Routed Experts: level 2 is a fixed, seeded token-id -> expert table."""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from pangu_moe.routing.base import Router, register, stack_losses


def build_rre_tables(vocab_size, experts_per_group, num_groups, seed):
    """Balanced random tables, one per group: a seeded permutation of the vocabulary dealt round-robin.

    Each expert of a group gets floor(V / E_g) or ceil(V / E_g) token ids.

    Returns:
        int32 array [G, V] of local expert ids in [0, E_g).
    """
    rng = np.random.default_rng(seed)
    tables = np.empty((num_groups, vocab_size), np.int32)
    for g in range(num_groups):
        perm = rng.permutation(vocab_size)
        tables[g, perm] = np.arange(vocab_size) % experts_per_group
    return tables


@register
class RandomRoutedRouter(Router):
    """RRE router (K = 1): expert = groups[group][table[group, token_id]], gate 1, no losses.

    The table is a non-trainable Parameter, so checkpoints carry it. With one group this is the
    "HashMoE" baseline (Roller et al. random hash).

    Args:
        tables: int32 [G, V] from `build_rre_tables` (seed it per layer).
        slot_policy: see `routing.slots`; gates and affinities are all 1, so probs and affinity
            fall back to an arbitrary but fixed order.
    """

    name = "rre"
    max_top_k = 1
    loss_terms = ()  # a fixed table: nothing to balance or regularise

    def __init__(self, tables, num_experts, slot_policy="position"):
        num_groups, _ = tables.shape
        super().__init__(num_experts, num_groups, 1, slot_policy)
        self.table = Parameter(Tensor(tables, ms.int32), name="table", requires_grad=False)

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        tables = build_rre_tables(model_cfg.vocab_size, moe_cfg.num_experts // moe_cfg.num_groups, moe_cfg.num_groups,
                                  seed=(moe_cfg.rre.seed, layer))
        return cls(tables, moe_cfg.num_experts, moe_cfg.slot_policy)

    def score(self, x, token_ids, group_ids, training, rank=None):
        """x is unused: the expert depends on (group, token id) only. Returns local_index [T,1] int32,
        gate and affinity [T,1] fp32 ones, all requested, and zero losses."""
        index = ops.stack((group_ids, token_ids), axis=1)  # (T, 2)
        local_index = ops.gather_nd(self.table, index).reshape(-1, 1)  # (T, 1)
        gate = ops.ones(local_index.shape, ms.float32)
        zero = ops.zeros((), ms.float32)
        return local_index, gate, gate, None, stack_losses(zero, zero, zero)

"""DeepSeek-V3 routing (arXiv 2412.19437 §2.1.2): sigmoid affinities, a selection bias balanced by a
sign rule instead of an auxiliary loss, node-limited top-k, and a tiny sequence-wise balance loss.

- s = sigmoid(x W) over the token's group; the top-K experts by s + b are selected, where b [G, E_g] fp32
  is not trained by gradients: after every step the trainer calls `after_step` with the step's demand
  and b moves by gamma * sign(mean load - load) within each group (Wang et al., arXiv 2408.15664).
- Gates are the selected s, normalised to sum to 1 when K > 1 (at K = 1 the raw sigmoid, so the LM loss
  trains the router, as in Megatron-Core and MindFormers), times `scaling`; the bias never enters a gate.
- Node-limited routing: with `node_limit` M > 0, a node's score is the sum of its top max(1, K/M) values
  of s + b among the token's experts on that node (the topology's placement); only the M best nodes stay
  selectable, so a token's experts span at most M nodes.
- Sequence-wise loss: alpha * sum_i f_i P_i per sequence (f_i = E_g/(K*S) * choices of i in the sequence,
  P_i = mean over the sequence of s normalised per token), averaged over sequences; training only, and
  logged in the aux_loss slot. No auxiliary load-balancing loss (moe.aux_loss_coeff is rejected); the
  z-loss on the logits applies (moe.z_loss_coeff).
- Capacity: DeepSeek drops nothing; use moe.slot_policy=none for that, or any policy to cap the load.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from pangu_moe.config import ConfigError
from pangu_moe.routing import losses
from pangu_moe.routing.base import LearnedRouter, register, stack_losses


def node_limit_mask(biased, node_of, group_ids, num_nodes, node_limit, top_k):
    """[T, E_g] bool: the experts on the `node_limit` best nodes of each token.

    Args:
        biased: [T, E_g] fp32 selection scores s + b; node_of: [G, E_g] int32 node of each expert;
        group_ids: [T] int32; num_nodes: N; node_limit: M; top_k: K.
    """
    token_nodes = ops.gather(node_of, group_ids, 0)  # (T, E_g)
    per_node = max(1, top_k // node_limit)
    low = Tensor(-1e30, ms.float32)
    node_scores = []
    for n in range(num_nodes):
        on_node = token_nodes == n
        masked = ops.select(on_node, biased, ops.broadcast_to(low, biased.shape))
        best = ops.topk(masked, min(per_node, biased.shape[1]))[0]
        # A node without any of the token's experts never ranks above one with experts.
        node_scores.append(ops.select(on_node.any(1), best.sum(1), ops.broadcast_to(low, best.shape[:1])))
    node_scores = ops.stack(node_scores, axis=1)  # (T, N)
    threshold = ops.topk(node_scores, node_limit)[0][:, -1:]  # (T, 1): score of the M-th best node
    allowed = node_scores >= threshold  # (T, N)
    return ops.gather_elements(allowed.astype(ms.int32), 1, token_nodes) > 0


@register
class DeepSeekRouter(LearnedRouter):
    """Args: hidden H; num_experts E; num_groups G; top_k K; seq_len S; seq_aux_coeff alpha; bias_rate gamma;
    node_limit M (0: none); expert_node: int array [E] (topology placement); num_nodes N; scaling; init_std;
    slot_policy; z_loss_coeff."""

    name = "deepseek"
    loss_terms = ("z",)

    def __init__(self, hidden, num_experts, num_groups, top_k, seq_len, seq_aux_coeff, bias_rate, node_limit,
                 expert_node, num_nodes, scaling=1.0, init_std=0.02, slot_policy="position", z_loss_coeff=0.0):
        super().__init__(hidden, num_experts, num_groups, top_k, init_std, slot_policy)
        self.z_loss_coeff = z_loss_coeff
        self.bias = Parameter(Tensor(np.zeros((num_groups, self.experts_per_group), np.float32)), name="bias",
                              requires_grad=False)
        self.node_of = Tensor(np.asarray(expert_node, np.int32).reshape(num_groups, self.experts_per_group))
        self.seq_len, self.seq_aux_coeff, self.bias_rate = seq_len, seq_aux_coeff, bias_rate
        self.node_limit, self.num_nodes, self.scaling = node_limit, num_nodes, scaling

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        s = moe_cfg.deepseek
        return cls(model_cfg.hidden, moe_cfg.num_experts, moe_cfg.num_groups, moe_cfg.top_k, model_cfg.seq_len,
                   s.seq_aux_coeff, s.bias_rate, s.node_limit, topology.expert_node(), topology.nodes, s.scaling,
                   moe_cfg.topk.init_std, moe_cfg.slot_policy, moe_cfg.z_loss_coeff)

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        limit, nodes = cfg.moe.deepseek.node_limit, cfg.parallel.nodes
        if limit > nodes:
            raise ConfigError(f"moe.deepseek.node_limit = {limit!r}: must be at most parallel.nodes={nodes}")
        p = cfg.parallel
        if limit and (p.placement or p.placement_every):
            key, value = ("parallel.placement", p.placement) if p.placement else ("parallel.placement_every",
                                                                                  p.placement_every)
            raise ConfigError(f"{key} = {value!r}: must be {'[]' if p.placement else 0} with "
                              f"moe.deepseek.node_limit > 0 (its node groups are fixed where the experts start)")

    def score(self, x, token_ids, group_ids, training, rank=None):
        logits = self.logits(x, group_ids)
        scores = ops.sigmoid(logits)
        biased = scores + ops.gather(self.bias, group_ids, 0)  # (T, E_g)
        if self.node_limit > 0:
            allowed = node_limit_mask(biased, self.node_of, group_ids, self.num_nodes, self.node_limit, self.top_k)
            biased = ops.select(allowed, biased, ops.broadcast_to(Tensor(-1e30, ms.float32), biased.shape))
        _, local_index = ops.topk(biased, self.top_k)
        local_index = local_index.astype(ms.int32)
        selected = ops.gather_elements(scores, 1, local_index)
        gate = selected / selected.sum(-1, keepdims=True) if self.top_k > 1 else selected
        gate = self.scaling * gate
        zero = ops.zeros((), ms.float32)
        balance = zero
        if training and self.seq_aux_coeff > 0:
            balance = losses.sequence_balance_loss(scores, local_index, self.seq_len, self.seq_aux_coeff)
        return local_index, gate, selected, None, stack_losses(balance, losses.z_loss(logits, self.z_loss_coeff), zero)

    def after_step(self, tokens_per_expert):
        """Sign-rule bias update from one step's demand [E] (host side, eager `ops.assign`)."""
        if self.bias_rate == 0:
            return
        load = np.asarray(tokens_per_expert, np.float64).reshape(self.num_groups, self.experts_per_group)
        step = self.bias_rate * np.sign(load.mean(1, keepdims=True) - load)
        ops.assign(self.bias, Tensor((self.bias.asnumpy() + step).astype(np.float32)))

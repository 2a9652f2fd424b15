"""Routers by name: `moe.router` picks the class, `moe.<router>` holds its own settings."""
from pangu_moe.routing.balanced import BASERouter
from pangu_moe.routing.deepseek import DeepSeekRouter
from pangu_moe.routing.expert_choice import ExpertChoiceRouter
from pangu_moe.routing.kool_skip import KoolSkipRouter
from pangu_moe.routing.locmoe import LocMoERouter
from pangu_moe.routing.locmoe_plus import LocMoEPlusRouter
from pangu_moe.routing.rre import RandomRoutedRouter, build_rre_tables
from pangu_moe.routing.sinkhorn import SinkhornRouter
from pangu_moe.routing.topk import TopKRouter


def build_router(model_cfg, moe_cfg, layer, topology):
    """The level-2 router of MoE layer `layer` (0-based; seeds per-layer tables).

    Args:
        model_cfg: `config.ModelConfig`; moe_cfg: `config.MoEConfig`;
        topology: `dispatch.topology.Topology`, read by locality-aware routers.
    Returns:
        a `routing.base.Router`.
    """
    moe = moe_cfg
    common = dict(num_experts=moe.num_experts, num_groups=moe.num_groups, top_k=moe.top_k)
    if moe.router == "rre":
        tables = build_rre_tables(model_cfg.vocab_size, moe.num_experts // moe.num_groups, moe.num_groups,
                                  seed=(moe.rre.seed, layer))
        return RandomRoutedRouter(tables, moe.num_experts, moe.slot_policy)
    if moe.router == "locmoe":
        s = moe.locmoe
        return LocMoERouter(model_cfg.hidden, **common, aux_loss_coeff=moe.aux_loss_coeff,
                            z_loss_coeff=moe.z_loss_coeff, locality_coeff=s.locality_coeff,
                            locality_variant=s.locality_variant, local_mask=topology.local_expert_mask(),
                            use_bias=s.bias, slot_policy=moe.slot_policy)
    if moe.router == "locmoe_plus":
        s = moe.locmoe_plus
        return LocMoEPlusRouter(model_cfg.hidden, **common, aux_loss_coeff=moe.aux_loss_coeff,
                                z_loss_coeff=moe.z_loss_coeff, locality_coeff=s.locality_coeff,
                                locality_variant=s.locality_variant, local_mask=topology.local_expert_mask(),
                                keep_rule=s.keep_rule, switch_step=s.switch_step, switch_ratio=s.switch_ratio,
                                score_threshold=s.score_threshold, gate_temperature=s.gate_temperature,
                                coverage=s.coverage, ema=s.ema, non_increasing=s.non_increasing)
    if moe.router == "topk":
        s = moe.topk
        return TopKRouter(model_cfg.hidden, **common, aux_loss_coeff=moe.aux_loss_coeff,
                          z_loss_coeff=moe.z_loss_coeff, jitter_eps=s.jitter_eps, normalize=s.normalize_gates,
                          init_std=s.init_std, slot_policy=moe.slot_policy)
    if moe.router == "expert_choice":
        return ExpertChoiceRouter(model_cfg.hidden, moe.num_experts, moe.num_groups, moe.z_loss_coeff,
                                  moe.topk.init_std)
    if moe.router == "sinkhorn":
        return SinkhornRouter(model_cfg.hidden, **common, z_loss_coeff=moe.z_loss_coeff,
                              iterations=moe.sinkhorn.iterations, init_std=moe.topk.init_std,
                              slot_policy=moe.slot_policy)
    if moe.router == "deepseek":
        s = moe.deepseek
        return DeepSeekRouter(model_cfg.hidden, **common, seq_len=model_cfg.seq_len, seq_aux_coeff=s.seq_aux_coeff,
                              bias_rate=s.bias_rate, node_limit=s.node_limit, expert_node=topology.expert_node(),
                              num_nodes=topology.nodes, scaling=s.scaling, init_std=moe.topk.init_std,
                              slot_policy=moe.slot_policy)
    if moe.router == "base":
        return BASERouter(model_cfg.hidden, moe.num_experts, moe.num_groups, moe.z_loss_coeff, moe.topk.init_std)
    if moe.router == "kool_skip":
        return KoolSkipRouter(model_cfg.hidden, moe.num_experts, moe.num_groups, moe.z_loss_coeff, moe.topk.init_std)
    raise ValueError(f"moe.router = {moe.router!r}: no such router")

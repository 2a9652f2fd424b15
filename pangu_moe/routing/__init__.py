"""Routers: scoring rules plus slot assignment; see `routing.base` for the vocabulary."""
from pangu_moe.routing.balanced import BASERouter
from pangu_moe.routing.base import LOSS_NAMES, Router, Routing, route
from pangu_moe.routing.deepseek import DeepSeekRouter
from pangu_moe.routing.expert_choice import ExpertChoiceRouter
from pangu_moe.routing.kool_skip import KoolSkipRouter
from pangu_moe.routing.locmoe import LocMoERouter
from pangu_moe.routing.locmoe_plus import LocMoEPlusRouter
from pangu_moe.routing.registry import build_router
from pangu_moe.routing.rre import RandomRoutedRouter, build_rre_tables
from pangu_moe.routing.sinkhorn import SinkhornRouter
from pangu_moe.routing.slots import assign_slots, position_slots, priority_slots
from pangu_moe.routing.topk import TopKRouter, topk_scores

__all__ = ["LOSS_NAMES", "Router", "Routing", "route", "build_router", "TopKRouter", "topk_scores",
           "RandomRoutedRouter", "build_rre_tables", "LocMoERouter", "LocMoEPlusRouter", "ExpertChoiceRouter",
           "SinkhornRouter", "DeepSeekRouter", "BASERouter", "KoolSkipRouter", "assign_slots", "position_slots",
           "priority_slots"]

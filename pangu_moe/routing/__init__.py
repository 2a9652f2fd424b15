"""Routers: scoring rules plus slot assignment; see `routing.base` for the vocabulary."""
from pangu_moe.routing.base import LOSS_NAMES, Router, Routing, route
from pangu_moe.routing.locmoe import LocMoERouter
from pangu_moe.routing.rre import RandomRoutedRouter, build_rre_tables
from pangu_moe.routing.slots import position_slots
from pangu_moe.routing.topk import TopKRouter, topk_scores

__all__ = ["LOSS_NAMES", "Router", "Routing", "route", "LocMoERouter", "RandomRoutedRouter", "build_rre_tables",
           "TopKRouter", "topk_scores", "position_slots"]

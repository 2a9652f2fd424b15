"""Routers: scoring rules plus slot assignment; see `routing.base` for the vocabulary."""
from pangu_moe.routing.base import Router, Routing, route
from pangu_moe.routing.rre import RandomRoutedRouter, build_rre_tables
from pangu_moe.routing.topk import TopKRouter, topk_scores
from pangu_moe.routing.slots import position_slots

__all__ = ["Router", "Routing", "route", "RandomRoutedRouter", "build_rre_tables", "TopKRouter",
           "topk_scores", "position_slots"]

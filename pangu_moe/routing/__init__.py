"""Routers: scoring rules plus slot assignment; see `routing.base` for the vocabulary and the Router contract,
`routing.registry` for routers by name."""
from pangu_moe.routing.base import LOSS_NAMES, ROUTERS, Router, Routing, register, route
from pangu_moe.routing.registry import build_router, router_class
from pangu_moe.routing.slots import assign_slots, position_slots, priority_slots

__all__ = ["LOSS_NAMES", "ROUTERS", "Router", "Routing", "register", "route", "build_router", "router_class",
           "assign_slots", "position_slots", "priority_slots"]

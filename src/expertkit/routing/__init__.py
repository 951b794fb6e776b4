"""Routers: pick, per prompt, the expert that fits it, or the base when none does.

Each router kind is one module registered with `@register_router`; a trained
router lives in the library (`routers/<name>/`) and becomes a composition
through compose/route.py.
"""

from expertkit.routing import arrow, embedding, lexical, likelihood  # noqa: F401  (each module registers its router)
from expertkit.routing.base import BASE, Prompts, Router, TrainingData, register_router, router_kinds
from expertkit.routing.store import CalibratedRouter, Routing, find_router, load_router, save_router
from expertkit.routing.train import evaluate, train_router

__all__ = ["BASE", "CalibratedRouter", "Prompts", "Router", "Routing", "TrainingData", "evaluate", "find_router",
           "load_router", "register_router", "router_kinds", "save_router", "train_router"]

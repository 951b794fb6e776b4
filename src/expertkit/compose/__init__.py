"""Compositions: every way of answering with experts, through one interface (runtime.Composition).

A new strategy is one class registered for a library entry kind (`register`), or a collaboration
strategy (`compose.collaborate.collaboration`); evaluation, generation and serving never change.
"""

from expertkit.compose import adapters, card, collaborate, merged, mix, route  # noqa: F401  (each registers its kinds)
from expertkit.compose.base import COMPOSITIONS, register
from expertkit.compose.catalog import build_compositions

__all__ = ["COMPOSITIONS", "build_compositions", "register"]

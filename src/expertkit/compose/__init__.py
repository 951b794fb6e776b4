"""Compositions: every way of answering with experts returns next-token logits through one interface.

A new strategy is one class registered for a library entry kind (see
`register`); evaluation and generation never change.
"""

from expertkit.compose.base import Composition, DecodeState, build_compositions, register, registered_kinds
from expertkit.compose.pool import BASE_ADAPTER, ExpertPool
from expertkit.compose import adapters, merged, mix, route  # noqa: F401  (each module registers its compositions)

__all__ = ["BASE_ADAPTER", "Composition", "DecodeState", "ExpertPool", "build_compositions", "register",
           "registered_kinds"]

"""The composition registry: which strategy answers for a library entry of each kind."""

from __future__ import annotations

from typing import Callable

from expertkit.registry import Registry

# entry kind -> factory(pool, entry) -> Composition
COMPOSITIONS: Registry[Callable] = Registry("composition kind")


def register(kind: str):
    """Decorator: `@register(Kind.EXPERT)` makes library entries of that kind into compositions."""
    return COMPOSITIONS.register(kind)

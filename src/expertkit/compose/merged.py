"""A merged full model (library kind `merged_model`) as a composition: its own weights, same interface."""

from __future__ import annotations

from expertkit.base import load_base
from expertkit.compose.adapters import AdapterComposition
from expertkit.compose.base import register
from expertkit.library import Kind
from expertkit.runtime import BASE_ADAPTER, Composition, ExpertPool


@register(Kind.MERGED_MODEL)
def merged_model_composition(pool: ExpertPool, entry) -> Composition:
    merged = load_base(str(entry.path), device=str(pool.device))
    return AdapterComposition(ExpertPool(merged), BASE_ADAPTER, entry.name)

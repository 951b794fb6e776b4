"""The simplest compositions: the bare base, and one library adapter (an expert or a merge)."""

from __future__ import annotations

import torch

from expertkit.compose.base import register
from expertkit.library import BASE, Kind
from expertkit.runtime import BASE_ADAPTER, Composition, ExpertPool, PoolState


class AdapterComposition(Composition):
    """Every row answered by one adapter of the pool (BASE_ADAPTER = the base itself)."""

    def __init__(self, pool: ExpertPool, adapter: str, name: str):
        self.pool, self.adapter, self.name = pool, adapter, name

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_only: bool = False):
        return self.pool.prefill(input_ids, attention_mask, [self.adapter] * input_ids.shape[0], last_only=last_only)

    def step(self, state: PoolState, next_ids: torch.Tensor):
        return self.pool.step(state, next_ids)


@register(BASE)
def base_composition(pool: ExpertPool, entry) -> Composition:
    return AdapterComposition(pool, BASE_ADAPTER, BASE)


@register(Kind.EXPERT)
@register(Kind.MERGE)
def adapter_composition(pool: ExpertPool, entry) -> Composition:
    return AdapterComposition(pool, entry.name, entry.name)

"""The simplest compositions: the bare base, and one library adapter (an expert or a merge)."""

from __future__ import annotations

import torch

from expertkit.compose.base import Composition, DecodeState, register
from expertkit.compose.pool import BASE_ADAPTER, ExpertPool


class AdapterComposition(Composition):
    """Every row answered by one adapter of the pool (BASE_ADAPTER = the base itself)."""

    def __init__(self, pool: ExpertPool, adapter: str, name: str):
        self.pool, self.adapter, self.name = pool, adapter, name

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.pool.prefill(input_ids, attention_mask, [self.adapter] * input_ids.shape[0])

    def step(self, state: DecodeState, next_ids: torch.Tensor):
        return self.pool.step(state, next_ids, [self.adapter] * next_ids.shape[0])

    def row_adapters(self, rows: list[list[int]]) -> list[str]:
        return [self.adapter] * len(rows)


@register("base")
def base_composition(pool: ExpertPool, entry) -> Composition:
    return AdapterComposition(pool, BASE_ADAPTER, "base")


@register("expert")
@register("merge")
def adapter_composition(pool: ExpertPool, entry) -> Composition:
    return AdapterComposition(pool, entry.name, entry.name)

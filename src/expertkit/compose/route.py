"""Sequence-level routing as a composition: each row answered by the adapter its router picks.

Prefill routes every row from its own real tokens, then runs one mixed-adapter forward; the
state carries each row's adapter, so `step` keeps each row's choice (and a server can batch
these rows with any other rows of the pool). A library entry of kind `router` is this
composition, so the scorecard and the generator use it unchanged.
"""

from __future__ import annotations

import torch

from expertkit.compose.base import register
from expertkit.library import Kind
from expertkit.routing import Prompts, load_router
from expertkit.runtime import Composition, ExpertPool, PoolState
from expertkit.runtime.tokens import real_rows


class RoutedComposition(Composition):
    decides_from_prompt = True

    def __init__(self, pool: ExpertPool, calibrated, name: str):
        self.pool, self.router, self.name = pool, calibrated, name
        self.last_routing = None  # the most recent prefill's decisions, for reports

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_only: bool = False):
        rows = real_rows(input_ids, attention_mask, self.pool.context_length)
        self.last_routing = self.router.route(self.pool, Prompts.from_ids(self.pool.tokenizer, rows))
        return self.pool.prefill(input_ids, attention_mask, self.last_routing.adapters, last_only=last_only)

    def step(self, state: PoolState, next_ids: torch.Tensor):
        return self.pool.step(state, next_ids)


@register(Kind.ROUTER)
def routed_composition(pool: ExpertPool, entry) -> Composition:
    calibrated = load_router(pool.library, entry)
    pool.ensure(calibrated.experts)
    return RoutedComposition(pool, calibrated, entry.name)

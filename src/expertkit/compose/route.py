"""Sequence-level routing as a composition: each row answered by the composition its router picks.

Each of the router's choices (the base, its experts) is a composition of its own. Prefill routes
every row from its own real tokens; when every choice is an adapter of the pool (the usual case),
one mixed-adapter forward answers all rows, and the state carries each row's adapter, so `step`
keeps each row's choice and a server batches these rows with any other rows of the pool. Any other
choice runs as itself on its rows (compose/nesting.py). A library entry of kind `router` is this
composition, so the scorecard and the generator use it unchanged.
"""

from __future__ import annotations

import torch

from expertkit.compose.base import register
from expertkit.compose.nesting import SplitState, entry_composition, pool_adapters, split_prefill, split_step
from expertkit.library import BASE, Kind
from expertkit.routing import Prompts, load_router
from expertkit.runtime import Composition, ExpertPool
from expertkit.runtime.tokens import real_rows


class RoutedComposition(Composition):
    decides_from_prompt = True

    def __init__(self, pool: ExpertPool, calibrated, name: str, choices: dict[str, Composition]):
        self.pool, self.router, self.name, self.choices = pool, calibrated, name, choices
        self.last_routing = None  # the most recent prefill's decisions, for reports

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None = None):
        rows = real_rows(input_ids, attention_mask, self.pool.context_length)
        self.last_routing = self.router.route(self.pool, Prompts.from_ids(self.pool.tokenizer, rows))
        chosen = [self.choices[label] for label in self.last_routing.chosen]
        adapters = pool_adapters(self.pool, chosen)
        if adapters is None:
            return split_prefill(chosen, input_ids, attention_mask, keep_last)
        return self.pool.prefill(input_ids, attention_mask, adapters, keep_last=keep_last)

    def step(self, state, next_ids: torch.Tensor):
        if isinstance(state, SplitState):
            return split_step(state, next_ids)
        return self.pool.step(state, next_ids)


def route_to_entries(pool: ExpertPool, calibrated, name: str) -> RoutedComposition:
    """A router whose choices are the pool's compositions of its labels (its experts and the base)."""
    pool.ensure(calibrated.experts)
    choices = {label: entry_composition(pool, label) for label in [*calibrated.experts, BASE]}
    return RoutedComposition(pool, calibrated, name, choices)


@register(Kind.ROUTER)
def routed_composition(pool: ExpertPool, entry) -> Composition:
    return route_to_entries(pool, load_router(pool.library, entry), entry.name)

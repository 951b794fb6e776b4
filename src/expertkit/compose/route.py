"""Sequence-level routing as a composition: each row answered by the adapter its router picks.

Prefill routes every row from its own real tokens, then runs one mixed-adapter
forward; `step` keeps each row's choice. A library entry of kind `router` is
this composition, so the scorecard and the generator use it unchanged.
"""

from __future__ import annotations

import torch

from expertkit.compose.base import Composition, DecodeState, register
from expertkit.compose.pool import ExpertPool
from expertkit.errors import ExpertkitError


def real_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, context: int | None) -> list[list[int]]:
    """Each row's real tokens; empty rows and rows longer than the context are user errors."""
    lengths = attention_mask.sum(dim=1).tolist()
    if any(n == 0 for n in lengths):
        raise ExpertkitError(f"row {lengths.index(0)} of the batch is empty (no real tokens); give it a prompt")
    if context and max(lengths) > context:
        raise ExpertkitError(f"a prompt of {max(lengths)} tokens exceeds the model's context of {context}; "
                             "shorten it")
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]


class RoutedComposition(Composition):
    decides_from_prompt = True

    def __init__(self, pool: ExpertPool, calibrated, name: str):
        self.pool, self.router, self.name = pool, calibrated, name
        self.last_routing = None  # the most recent prefill's decisions, for reports

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        adapters = self.row_adapters(real_rows(input_ids, attention_mask, self.pool.context_length))
        logits, state = self.pool.prefill(input_ids, attention_mask, adapters)
        state.extra["adapters"] = adapters
        return logits, state

    def step(self, state: DecodeState, next_ids: torch.Tensor):
        return self.pool.step(state, next_ids, state.extra["adapters"])

    def row_adapters(self, rows: list[list[int]]) -> list[str]:
        from expertkit.routing import Prompts

        self.last_routing = self.router.route(self.pool, Prompts.from_ids(self.pool.tokenizer, rows))
        return self.last_routing.adapters


@register("router")
def routed_composition(pool: ExpertPool, entry) -> Composition:
    from expertkit.routing import load_router

    calibrated = load_router(pool.library, entry)
    pool.ensure(calibrated.experts)
    return RoutedComposition(pool, calibrated, entry.name)

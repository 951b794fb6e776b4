"""Compositions made of compositions: a router's choices (each row answered by one) and a mixture's
components (every row answered by all).

When every inner composition is one adapter of the same pool, the rows run in one mixed-adapter
forward of that pool (its state stays rows of the pool, which a server batches with anything);
otherwise each inner composition runs on its own rows, and their states travel together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertkit.compose.adapters import AdapterComposition
from expertkit.compose.base import COMPOSITIONS
from expertkit.errors import ExpertkitError
from expertkit.library import BASE
from expertkit.runtime import Composition, DecodeState, ExpertPool


def entry_composition(pool: ExpertPool, name: str) -> Composition:
    """The composition of the base or of one library entry, as its kind's registered factory makes it."""
    if name == BASE:
        return COMPOSITIONS[BASE](pool, None)
    entry = pool.library.get(name)
    if entry.kind not in COMPOSITIONS:
        raise ExpertkitError(f"library entry '{entry.name}' has kind '{entry.kind}' that no composition handles; "
                             f"known kinds: {COMPOSITIONS.listing()}")
    return COMPOSITIONS[entry.kind](pool, entry)


def pool_adapters(pool: ExpertPool, inners: list[Composition]) -> list[str] | None:
    """Each inner composition's adapter when every one answers with a single adapter of `pool`, else None."""
    if all(isinstance(c, AdapterComposition) and c.pool is pool for c in inners):
        return [c.adapter for c in inners]
    return None


def _put_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> torch.Tensor:
    """Logits of row groups [(row indices, logits)] put back in batch order."""
    first = parts[0][1]
    out = first.new_empty((rows, *first.shape[1:]))
    for index, logits in parts:
        out[index] = logits
    return out


@dataclass
class SplitState:
    """Rows answered by different inner compositions: per group, its composition, rows and state."""

    groups: list[tuple[Composition, torch.Tensor, DecodeState]]


def split_prefill(chosen: list[Composition], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  keep_last: int | None) -> tuple[torch.Tensor, SplitState]:
    """Row i answered by `chosen[i]`: one prefill per distinct composition, on its rows only."""
    parts, groups = [], []
    for composition in dict.fromkeys(chosen):
        index = torch.tensor([i for i, c in enumerate(chosen) if c is composition])
        logits, state = composition.prefill(input_ids[index], attention_mask[index], keep_last=keep_last)
        parts.append((index, logits))
        groups.append((composition, index, state))
    return _put_rows(parts, len(chosen)), SplitState(groups)


def split_step(state: SplitState, next_ids: torch.Tensor) -> tuple[torch.Tensor, SplitState]:
    parts, groups = [], []
    for composition, index, inner in state.groups:
        logits, inner = composition.step(inner, next_ids[index])
        parts.append((index, logits))
        groups.append((composition, index, inner))
    return _put_rows(parts, next_ids.shape[0]), SplitState(groups)


@dataclass
class StackedState:
    """Every inner composition's state over all the rows (the general path of `Stack`)."""

    states: list[DecodeState]


class Stack:
    """Every row answered by each of `inners`: logits [B, C, ...] with C = len(inners).

    One mixed-adapter forward over C copies of each row when all inners are adapters of `pool`;
    else each inner composition on the whole batch.
    """

    def __init__(self, pool: ExpertPool, inners: list[Composition]):
        self.pool, self.inners = pool, list(inners)
        self.adapters = pool_adapters(pool, self.inners)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        n = len(self.inners)
        if self.adapters is not None:
            logits, state = self.pool.prefill(input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0),
                                              self.adapters * input_ids.shape[0])
            return logits.view(input_ids.shape[0], n, *logits.shape[1:]), state
        outputs = [c.prefill(input_ids, attention_mask) for c in self.inners]
        return torch.stack([o[0] for o in outputs], 1), StackedState([o[1] for o in outputs])

    def step(self, state, next_ids: torch.Tensor):
        n = len(self.inners)
        if self.adapters is not None:
            logits, state = self.pool.step(state, next_ids.repeat_interleave(n, 0))
            return logits.view(next_ids.shape[0], n, -1), state
        outputs = [c.step(s, next_ids) for c, s in zip(self.inners, state.states)]
        return torch.stack([o[0] for o in outputs], 1), StackedState([o[1] for o in outputs])

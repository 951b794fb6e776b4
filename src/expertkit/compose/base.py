"""The composition interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from expertkit.errors import ExpertkitError
from expertkit.registry import Registry


@dataclass
class DecodeState:
    """What a composition carries between steps: its KV cache(s), the mask, the next position per row."""

    past: object
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    extra: dict = field(default_factory=dict)


class Composition(ABC):
    """Given token ids, return next-token logits. Rows are left-padded; `attention_mask` marks real tokens."""

    name: str
    # True when the answer for a row depends on that row's whole prompt (a router reads it to choose):
    # scored on tokens of its own prompt it would see what it is scored on, so scoring feeds it a prefix
    # and steps through the rest (see evaluate.nll_sum).
    decides_from_prompt: bool = False

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Logits for every position [B, T, V] (perplexity needs all of them), plus the state to continue."""

    @abstractmethod
    def step(self, state: DecodeState, next_ids: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Logits [B, V] for one new token per row, reusing the caches."""

    def row_adapters(self, rows: list[list[int]]) -> list[str] | None:
        """When every row is answered by ONE adapter of `self.pool` alone, which adapter per row.

        Such rows are interchangeable with any other pool row, so a server batches them together
        across requests and compositions. None (the default): this composition needs its own loop.
        """
        return None

    def stats(self) -> dict:
        """Counters worth reporting after a run (e.g. the share of tokens a collaboration deferred); none here."""
        return {}


# entry kind -> factory(pool, entry) -> Composition
COMPOSITIONS: Registry[Callable] = Registry("composition kind")


def register(kind: str):
    """Decorator: `@register("expert")` makes library entries of that kind into compositions."""
    return COMPOSITIONS.register(kind)


def registered_kinds() -> list[str]:
    return COMPOSITIONS.names()


def build_compositions(pool, names: list[str] | None = None) -> list[Composition]:
    """The base plus one composition per library entry (or just `names`, in that order)."""
    by_name = {"base": COMPOSITIONS["base"](pool, None)}
    for entry in list(pool.entries):  # a factory may attach the entries it needs (see ExpertPool.ensure)
        if entry.kind not in COMPOSITIONS:
            raise ExpertkitError(f"library entry '{entry.name}' has kind '{entry.kind}' that no composition handles; "
                                 f"known kinds: {COMPOSITIONS.listing()}")
        by_name[entry.name] = COMPOSITIONS[entry.kind](pool, entry)
    if names is None:
        return list(by_name.values())
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ExpertkitError(f"unknown composition(s) {missing}; available: {sorted(by_name)}")
    return [by_name[n] for n in names]

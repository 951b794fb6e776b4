"""What a composition carries between decoding steps, typed per composition (see compose/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter on this row"


@dataclass(frozen=True)
class AdapterMix:
    """A row answered with the weighted sum of several adapters' ΔW (no merged copy is made).

    Its name is `mix:a=0.7,b=0.3`: the form a request names it by, and the form the server reports.
    """

    weights: tuple[tuple[str, float], ...]

    def __str__(self) -> str:
        return "mix:" + ",".join(f"{name}={weight:g}" for name, weight in self.weights)

    @property
    def adapters(self) -> list[str]:
        return [name for name, _ in self.weights]


RowAdapter = Union[str, AdapterMix]  # what one row of a pool batch is answered with


@dataclass
class DecodeState:
    """One forward path's KV cache, the attention mask over it, and the next position of each row."""

    past: object
    attention_mask: torch.Tensor
    next_position: torch.Tensor


@dataclass
class PoolState(DecodeState):
    """Rows of an ExpertPool, row i answered by adapter `adapters[i]` (BASE_ADAPTER: the bare base).

    `pool` says whose cache this is: a server joins such rows with any other rows of the same pool
    into its one running batch (see serve/engine.py), whatever composition admitted them.
    """

    adapters: list[RowAdapter]
    pool: object  # the ExpertPool (typed loosely only to keep this module free of the pool's imports)

"""What a composition carries between decoding steps, typed per composition (see compose/)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter on this row"


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

    adapters: list[str]
    pool: object  # the ExpertPool (typed loosely only to keep this module free of the pool's imports)

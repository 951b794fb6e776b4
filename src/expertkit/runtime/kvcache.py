"""Growing and shrinking a running batch's KV cache, so requests join and leave between decoding steps.

Rows are left-padded: every row's newest token sits in the last column, and the attention
mask marks which cache columns are real. Joining two batches pads the shorter one on the
left; dropping rows also drops leading columns that no remaining row uses.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from expertkit.errors import ExpertkitError
from expertkit.runtime.state import PoolState


def check_joinable(past) -> None:
    """Continuous batching edits caches row-wise; that needs plain dynamic layers (the pool's prefill makes
    them, sliding-window models included: a cache from elsewhere may be of another kind)."""
    layers = getattr(past, "layers", None)
    if not isinstance(past, DynamicCache) or layers is None or any(type(layer) is not DynamicLayer
                                                                   for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(past).__name__]
        raise ExpertkitError(f"continuous batching needs a model with a full-attention DynamicCache; this model "
                             f"uses {kinds}; serve it with --max-batch 1")


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def join(a: PoolState, b: PoolState) -> PoolState:
    """One state holding a's rows then b's rows (the caches are modified in place and reused)."""
    width = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
    for layer_a, layer_b in zip(a.past.layers, b.past.layers):
        layer_a.keys = torch.cat([_pad_left(layer_a.keys, width, -2), _pad_left(layer_b.keys, width, -2)])
        layer_a.values = torch.cat([_pad_left(layer_a.values, width, -2), _pad_left(layer_b.values, width, -2)])
    mask = torch.cat([_pad_left(a.attention_mask, width, 1), _pad_left(b.attention_mask, width, 1)])
    return PoolState(a.past, mask, torch.cat([a.next_position, b.next_position]), a.adapters + b.adapters, a.pool)


def keep_rows(state: PoolState, rows: list[int]) -> PoolState:
    """Only `rows` (in that order), without the leading columns that none of them attends to."""
    index = torch.tensor(rows, dtype=torch.long, device=state.attention_mask.device)
    mask = state.attention_mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in state.past.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return PoolState(state.past, mask[:, start:], state.next_position.index_select(0, index),
                     [state.adapters[i] for i in rows], state.pool)

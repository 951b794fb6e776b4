"""What routers that run the model read from it: pooled hidden states, and per-row loss under each adapter.

Prompts longer than `settings.max_tokens` (or the model's context) are cut to
their last tokens: the documented fallback, since a domain shows in any stretch
of a prompt and the end is nearest to what will be generated.
"""

from __future__ import annotations

from typing import Callable

import torch

from expertkit.routing.base import Prompts
from expertkit.runtime import BASE_ADAPTER
from expertkit.runtime.logprobs import mean_token_log_prob
from expertkit.runtime.tokens import pad_id, pad_left, position_ids


def token_budget(pool, settings) -> int:
    context = pool.context_length
    return min(settings.max_tokens, context) if context else settings.max_tokens


def map_batches(pool, prompts: Prompts, settings, fn: Callable, per_prompt_rows: int = 1) -> torch.Tensor:
    """fn(ids, mask) -> [n, ...] over left-padded batches of similar-length prompts, rows back in prompt order.

    Sorting by length first keeps padding (wasted compute) small when prompts differ in length;
    a batch holds at most batch_size rows once each prompt is repeated `per_prompt_rows` times.
    """
    budget = token_budget(pool, settings)
    pad = pad_id(pool.tokenizer)
    rows = [r[-budget:] for r in prompts.ids]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    step = max(1, settings.batch_size // per_prompt_rows)
    parts = [fn(*pad_left([rows[i] for i in order[s:s + step]], pad)) for s in range(0, len(order), step)]
    out = torch.cat(parts)
    return out[torch.argsort(torch.tensor(order))]


@torch.no_grad()
def mean_hidden_states(pool, prompts: Prompts, settings) -> torch.Tensor:
    """[N, layers + 1, H] the base model's hidden states (embeddings and every layer) averaged over real tokens."""

    def pooled(ids, mask):
        result = pool.forward(ids, mask, [BASE_ADAPTER] * len(ids), position_ids=position_ids(mask),
                              output_hidden_states=True)
        hidden = torch.stack(result.hidden_states, dim=1).float()  # [n, layers + 1, T, H]
        weights = mask.to(hidden.device, hidden.dtype)[:, None, :, None]
        return ((hidden * weights).sum(2) / weights.sum(2)).cpu()

    return map_batches(pool, prompts, settings, pooled)


@torch.no_grad()
def mean_token_nll(pool, prompts: Prompts, adapters: list[str], settings) -> torch.Tensor:
    """[N, len(adapters)] mean next-token loss of each prompt under each adapter, every adapter in one forward.

    Each prompt is repeated once per adapter and the rows go through one mixed-adapter batch
    (PEFT's per-sample `adapter_names`). A one-token prompt has no next token: its loss is 0 everywhere.
    """
    n_adapters = len(adapters)

    def losses(ids, mask):
        rows = len(ids)
        rep_ids, rep_mask = ids.repeat_interleave(n_adapters, 0), mask.repeat_interleave(n_adapters, 0)
        logits, _ = pool.prefill(rep_ids, rep_mask, adapters * rows)
        return -mean_token_log_prob(logits, rep_ids, rep_mask).view(rows, n_adapters).cpu()

    return map_batches(pool, prompts, settings, losses, per_prompt_rows=n_adapters)

"""Per-token log-likelihood of the tokens a batch holds: written once for scoring, routing and the server."""

from __future__ import annotations

import torch


def next_token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token t+1 | tokens <= t) [B, T-1], which of them count [B, T-1]).

    A position counts when both the token and the one predicting it are real (not padding).
    `logits` [B, T, V] may come from any composition; log-softmax is taken in float32.
    """
    ids, mask = input_ids.to(logits.device), attention_mask.to(logits.device)
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    counted = (mask[:, 1:] * mask[:, :-1]).bool()
    return picked.masked_fill(~counted, 0.0), counted


def mean_token_log_prob(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] each row's mean log-probability over its counted tokens (0 for a row of one token)."""
    picked, counted = next_token_log_probs(logits, input_ids, attention_mask)
    return picked.sum(-1) / counted.sum(-1).clamp(min=1)

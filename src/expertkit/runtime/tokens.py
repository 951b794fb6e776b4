"""Prompts as token rows, and rows as left-padded batches: the one place padding is decided."""

from __future__ import annotations

import torch

from expertkit.encoding import encode_texts
from expertkit.errors import ExpertkitError


def pad_id(tokenizer) -> int:
    """The id that fills masked positions: the pad token, else end-of-text (its value never reaches a real row)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def pad_left(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids, mask), right-aligned so every row's next token comes at the same column."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return input_ids, mask


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt texts as token rows (an empty prompt without a prefix becomes end-of-text: every row has a token)."""
    return [row or [tokenizer.eos_token_id] for row in encode_texts(tokenizer, prompts)]


def left_pad(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_left(encode_prompts(tokenizer, prompts), pad_id(tokenizer))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions as alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def real_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, context: int | None = None) -> list[list[int]]:
    """Each row's real tokens; empty rows and rows longer than the context are user errors."""
    lengths = attention_mask.sum(dim=1).tolist()
    if any(n == 0 for n in lengths):
        raise ExpertkitError(f"row {lengths.index(0)} of the batch is empty (no real tokens); give it a prompt")
    if context and max(lengths) > context:
        raise ExpertkitError(f"a prompt of {max(lengths)} tokens exceeds the model's context of {context}; "
                             "shorten it")
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]

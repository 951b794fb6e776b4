"""How the next token is chosen: greedy, or nucleus sampling from a seeded generator per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertkit.config import GENERATE
from expertkit.errors import ExpertkitError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = GENERATE.max_tokens
    temperature: float = GENERATE.temperature  # 0 = greedy
    top_p: float = GENERATE.top_p
    seed: int = GENERATE.seed
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ExpertkitError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ExpertkitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ExpertkitError(f"top_p must be in (0, 1], got {self.top_p}")


def choose_next(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Greedy at temperature 0, else nucleus sampling, row i from its own seeded generator `generators[i]`.

    One generator per row makes a seed mean the same thing wherever a prompt runs: its sample does not depend
    on the other rows of its batch (generate() with several prompts, the server's running batch).
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    rows = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs.cpu(), generators)]
    return torch.cat(rows).to(logits.device)

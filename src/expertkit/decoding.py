"""The one generation loop: prefill, then step with KV caches until max tokens, EOS or a stop string."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertkit.compose import Composition
from expertkit.errors import ExpertkitError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
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


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids, mask), right-aligned so every row's next token comes at the same column."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return input_ids, mask


def pad_id(tokenizer) -> int:
    """The id that fills masked positions: the pad token, else end-of-text (its value never reaches a real row)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt texts as token rows (an empty prompt becomes end-of-text, so every row has a token)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for p in prompts]


def left_pad(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_left(encode_prompts(tokenizer, prompts), pad_id(tokenizer))


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def generate(composition: Composition, tokenizer, prompts: list[str], params: SamplingParams = SamplingParams(),
             context_length: int | None = None) -> list[str]:
    """Continue each prompt; returns only the new text of each row."""
    return generate_ids(composition, tokenizer, encode_prompts(tokenizer, prompts), params, context_length)


@torch.no_grad()
def generate_ids(composition: Composition, tokenizer, rows: list[list[int]], params: SamplingParams = SamplingParams(),
                 context_length: int | None = None) -> list[str]:
    """Continue each prompt given as token ids; returns only the new text of each row."""
    input_ids, mask = pad_left(rows, pad_id(tokenizer))
    if context_length and input_ids.shape[1] + params.max_new_tokens > context_length:
        raise ExpertkitError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens {params.max_new_tokens} "
                             f"exceeds the model's context of {context_length}; shorten one of them")
    n = len(rows)
    generators = [torch.Generator().manual_seed(params.seed) for _ in range(n)]
    new_tokens: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    if params.max_new_tokens == 0:
        return [""] * n
    logits, state = composition.prefill(input_ids, mask)
    logits = logits[:, -1]
    for _ in range(params.max_new_tokens):
        next_ids = choose_next(logits, params, generators)
        for i, t in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if t == tokenizer.eos_token_id:
                done[i] = True
                continue
            new_tokens[i].append(t)
            if params.stop and _cut_at_stop(tokenizer.decode(new_tokens[i]), params.stop)[1]:
                done[i] = True
        if all(done):
            break
        logits, state = composition.step(state, next_ids)
    return [_cut_at_stop(tokenizer.decode(t), params.stop)[0] for t in new_tokens]

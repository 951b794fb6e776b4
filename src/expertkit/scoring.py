"""Log-probabilities of continuations given prompts, through the composition interface.

One code path for every metric that scores given text: the scorecard's leak-free perplexity and the
task evaluation's log-likelihoods (lm-evaluation-harness requests) both come here. A composition that
decides from its prompt (a router) is given only the prompt, so it never reads the tokens it is scored
on; it then steps through the continuation. Any other composition scores prompt + continuation in one
prefill, which gives the same numbers faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertkit.runtime import Composition
from expertkit.runtime.tokens import pad_left


@dataclass
class Scored:
    log_probs: torch.Tensor  # [len(continuation)]: each continuation token's log-probability
    greedy: bool  # every continuation token was the most likely one

    @property
    def total(self) -> float:
        return float(self.log_probs.sum())


@torch.no_grad()
def continuation_log_probs(composition: Composition, rows: list[tuple[list[int], list[int]]],
                           pad: int) -> list[Scored]:
    """For each (prompt, continuation) row: every continuation token scored given all tokens before it."""
    if any(not prompt or not continuation for prompt, continuation in rows):
        raise ValueError("every row needs at least one prompt token and one continuation token")
    if composition.decides_from_prompt:
        return _stepped(composition, rows, pad)
    return _one_prefill(composition, rows, pad)


def _one_prefill(composition: Composition, rows, pad: int) -> list[Scored]:
    ids, mask = pad_left([prompt + continuation[:-1] for prompt, continuation in rows], pad)
    # rows are left-padded, so every continuation sits in the last columns: the model's head runs only there
    logits, _ = composition.prefill(ids, mask, keep_last=max(len(continuation) for _, continuation in rows))
    out = []
    for i, (_, continuation) in enumerate(rows):
        log_probs = logits[i, -len(continuation):].float().log_softmax(-1)
        out.append(_scored(log_probs, continuation))
    return out


def _stepped(composition: Composition, rows, pad: int) -> list[Scored]:
    ids, mask = pad_left([prompt for prompt, _ in rows], pad)
    logits, state = composition.prefill(ids, mask)
    current, longest = logits[:, -1], max(len(c) for _, c in rows)
    per_row: list[list[torch.Tensor]] = [[] for _ in rows]
    for j in range(longest):
        for i, (_, continuation) in enumerate(rows):
            if j < len(continuation):
                per_row[i].append(current[i].float())
        if j + 1 < longest:  # feed each row's own token j (padding for rows already done)
            next_ids = torch.tensor([c[j] if j < len(c) else pad for _, c in rows])
            current, state = composition.step(state, next_ids)
    return [_scored(torch.stack(steps).log_softmax(-1), continuation)
            for steps, (_, continuation) in zip(per_row, rows)]


def _scored(log_probs: torch.Tensor, continuation: list[int]) -> Scored:
    target = torch.tensor(continuation, device=log_probs.device)
    chosen = log_probs.gather(-1, target[:, None]).squeeze(-1)
    return Scored(chosen.cpu(), bool((log_probs.argmax(-1) == target).all()))

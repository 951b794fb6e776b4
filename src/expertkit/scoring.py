"""Log-probabilities of continuations given prompts, through the composition interface.

One code path for every metric that scores given text: the scorecard's leak-free perplexity and the
task evaluation's log-likelihoods (lm-evaluation-harness requests) both come here. A composition that
decides from its prompt (a router) is given only the prompt, so it never reads the tokens it is scored
on; it then steps through the continuation. Any other composition scores prompt + continuation in one
prefill, which gives the same numbers faster. Rows that share their prompt and continue it by one token
(yes/no, a topic word: most choices of a classification task) need the same forward, so they get one between
them, as lm-eval's own `hf` model shares them.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    sharing: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        sharing.setdefault(forward_key(row), []).append(i)
    forwards = [rows[members[0]] for members in sharing.values()]
    score = _stepped if composition.decides_from_prompt else _one_prefill
    out: list[Scored | None] = [None] * len(rows)
    for members, log_probs in zip(sharing.values(), score(composition, forwards, pad)):
        for i in members:
            out[i] = _scored(log_probs, rows[i][1])
    return out


def forward_key(row: tuple[list[int], list[int]]) -> tuple:
    """Rows with equal keys are scored by one forward: a one-token continuation needs only its prompt's."""
    prompt, continuation = row
    return (tuple(prompt),) if len(continuation) == 1 else (tuple(prompt), tuple(continuation))


def _one_prefill(composition: Composition, rows, pad: int) -> Iterator[torch.Tensor]:
    """Each row's [len(continuation), vocab] log-probabilities from one prefill of prompt + continuation (one
    row's at a time: with a 262k vocabulary a batch's would be gigabytes)."""
    ids, mask = pad_left([prompt + continuation[:-1] for prompt, continuation in rows], pad)
    # rows are left-padded, so every continuation sits in the last columns: the model's head runs only there
    logits, _ = composition.prefill(ids, mask, keep_last=max(len(continuation) for _, continuation in rows))
    for i, (_, continuation) in enumerate(rows):
        yield logits[i, -len(continuation):].float().log_softmax(-1)


def _stepped(composition: Composition, rows, pad: int) -> Iterator[torch.Tensor]:
    """The same log-probabilities from a prefill of the prompt alone, then one step per continuation token."""
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
    for steps in per_row:
        yield torch.stack(steps).log_softmax(-1)


def _scored(log_probs: torch.Tensor, continuation: list[int]) -> Scored:
    target = torch.tensor(continuation, device=log_probs.device)
    chosen = log_probs.gather(-1, target[:, None]).squeeze(-1)
    return Scored(chosen.cpu(), bool((log_probs.argmax(-1) == target).all()))

"""How an expert learns the general rows that replay mixes into its batches (`training.replay_loss`).

Replay is there so that an expert keeps the base's general ability. Two ways to learn those rows:
- "lm" (the default): next-token cross-entropy, like the domain rows. It also teaches the general corpus
  itself, format and all: on WikiText (tokenized text: " , ", " @-@ ", "<unk>") a SmolLM2 expert's WikiText
  perplexity halves, the corpus learned rather than the base kept, and its zero-shot general tasks end 0.8-1.2
  points lower than with "kl" (README, "Real models").
- "kl": on the general rows, match the base's own next-token distribution, KL(base || expert), the base being
  the same model with the adapter switched off (Learning without Forgetting). The general rows then pull the
  expert back toward the base, whatever corpus they come from; the domain rows keep their own loss. It costs
  one forward of the base, without gradients, on the general rows.

A replay loss wraps the loss the domain rows get (next-token cross-entropy, or porting's compatible loss) into
the loss of a whole batch; each part weighs as many as the targets it scores.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from expertkit.data import REPLAY_ROWS, Blocks
from expertkit.registry import Registry

BatchLoss = Callable[[object, Blocks, object], torch.Tensor]  # (model, batch, device) -> scalar loss

REPLAY_LOSSES: Registry[Callable[[BatchLoss], BatchLoss]] = Registry("replay loss")


@REPLAY_LOSSES.register("lm")
def same_as_domain(domain_loss: BatchLoss) -> BatchLoss:
    """General rows learned as text, with the domain rows' loss: the classic replay."""
    return domain_loss


@REPLAY_LOSSES.register("kl")
def kl_to_base(domain_loss: BatchLoss) -> BatchLoss:
    """General rows matched to the base's distribution; domain rows keep `domain_loss`."""

    def loss(model, batch: Blocks, device) -> torch.Tensor:
        replay = batch.source == REPLAY_ROWS if batch.source is not None else torch.zeros(len(batch), dtype=torch.bool)
        parts = [(rows, rows.scored_tokens(), part_loss)
                 for rows, part_loss in ((batch.take(~replay), domain_loss), (batch.take(replay), base_divergence))]
        parts = [(rows, n, part_loss) for rows, n, part_loss in parts if n > 0]
        total = sum(n for _, n, _ in parts)
        return sum(part_loss(model, rows, device) * (n / total) for rows, n, part_loss in parts)

    return loss


def base_divergence(model, rows: Blocks, device) -> torch.Tensor:
    """Mean over the rows' scored positions of KL(base || model); `model` is a PEFT model (its adapter off = base)."""
    ids, mask = rows.input_ids.to(device), rows.attention_mask.to(device)
    scored = (rows.labels[:, 1:] != -100).to(device)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float()
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(base, -1), log_target=True, reduction="batchmean")


def replay_loss(name: str, domain_loss: BatchLoss) -> BatchLoss:
    """The loss of a whole batch for the recipe's `replay_loss` (an unknown name: a clear error)."""
    return REPLAY_LOSSES.get(name)(domain_loss)

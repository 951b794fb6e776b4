"""The compatible refresh's loss (MUSCLE): learn the domain, and keep the old expert's right answers.

A plain refresh fits the new base to the domain text and, on the way, changes answers the old expert
got right: negative flips, which users see as regressions. MUSCLE's remedy is to also match the old
model where it was right. On text, "right" is a token the old expert predicted (its argmax is the
target); there the loss adds KL(old expert || new expert), elsewhere it is the plain LM loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertkit.data import Blocks


@dataclass(frozen=True)
class CompatibleLoss:
    """A picklable spec (train.LossSpec): the old base and old expert are loaded where the job runs."""

    old_base: str  # path of the library's base
    old_identity: dict  # checked when it is loaded
    old_adapter: str  # the old expert's adapter dir
    weight: float  # of the KL term beside the LM loss

    def describe(self) -> dict:
        return {"kind": "compatible (MUSCLE)", "old_base": self.old_identity, "old_adapter": self.old_adapter,
                "weight": self.weight}

    def build(self, device):
        return CompatibleObjective(load_old_expert(self.old_base, self.old_identity, self.old_adapter, device),
                                   self.weight)


def load_old_expert(base_path: str, identity: dict, adapter_dir: str, device):
    """The old expert as one plain model (its ΔW merged into a private copy of the old base): the teacher."""
    from peft import PeftModel

    from expertkit.base import BaseSpec

    base = BaseSpec(base_path, identity, device=str(device)).load_private()
    model = PeftModel.from_pretrained(base.model, adapter_dir).merge_and_unload()
    model.eval().requires_grad_(False)
    return model


class CompatibleObjective:
    """loss = LM loss + weight * mean KL(old || new) over the tokens the old expert predicted right."""

    def __init__(self, teacher, weight: float):
        self.teacher = teacher
        self.weight = weight

    def __call__(self, model, batch: Blocks, device) -> torch.Tensor:
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        targets = batch.labels.to(device)[:, 1:]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        with torch.no_grad():
            old = self.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        right = (old.argmax(-1) == targets) & (targets != -100)
        if not right.any():
            return lm
        kl = F.kl_div(F.log_softmax(logits[right], -1), F.log_softmax(old[right], -1), log_target=True,
                      reduction="batchmean")
        return lm + self.weight * kl

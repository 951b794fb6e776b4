"""The compatible refresh's loss (MUSCLE): learn the domain, and keep the old expert's right answers.

A plain refresh fits the new base to the domain text and, on the way, changes answers the old expert
got right: negative flips, which users see as regressions. MUSCLE's remedy is to also match the old
model where it was right. On text, "right" is a token the old expert predicted (its argmax is the
target); there the loss adds KL(old expert || new expert), elsewhere it is the plain LM loss. Where the
domain has a labeled task, the same weight also keeps the old expert's right answers on its validation
questions (porting.task_term).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertkit.data import Blocks
from expertkit.porting.task_term import ChoiceDistillation, ChoiceExample

CHOICES_PER_STEP = 2  # labeled questions the answer term reads a step: about one LM batch's compute


@dataclass(frozen=True)
class CompatibleLoss:
    """A picklable spec (train.LossSpec): the old base and old expert are loaded where the job runs."""

    old_base: str  # path of the library's base
    old_identity: dict  # checked when it is loaded
    old_adapter: str  # the old expert's adapter dir
    weight: float  # of each KL term beside the LM loss
    task: str | None = None  # the labeled task whose validation questions `choices` holds
    choices: tuple[ChoiceExample, ...] = ()
    seed: int = 0

    def describe(self) -> dict:
        out = {"kind": "compatible (MUSCLE)", "old_base": self.old_identity, "old_adapter": self.old_adapter,
               "weight": self.weight}
        if self.choices:
            digest = hashlib.sha256(repr(self.choices).encode()).hexdigest()[:16]
            out["answers"] = {"task": self.task, "questions": len(self.choices), "sha256": digest,
                              "per_step": CHOICES_PER_STEP}
        return out

    def build(self, device):
        teacher = load_old_expert(self.old_base, self.old_identity, self.old_adapter, device)
        answers = (ChoiceDistillation(teacher, list(self.choices), device, CHOICES_PER_STEP, self.seed)
                   if self.choices else None)
        return CompatibleObjective(teacher, self.weight, answers)


def load_old_expert(base_path: str, identity: dict, adapter_dir: str, device):
    """The old expert as one plain model (its ΔW merged into a private copy of the old base): the teacher."""
    from peft import PeftModel

    from expertkit.base import BaseSpec

    base = BaseSpec(base_path, identity, device=str(device)).load_private()
    model = PeftModel.from_pretrained(base.model, adapter_dir).merge_and_unload()
    model.eval().requires_grad_(False)
    return model


class CompatibleObjective:
    """loss = LM loss + weight * mean KL(old || new) over the tokens the old expert predicted right
    (+ weight * the answer term, with `answers`)."""

    def __init__(self, teacher, weight: float, answers: ChoiceDistillation | None = None):
        self.teacher = teacher
        self.weight = weight
        self.answers = answers

    def __call__(self, model, batch: Blocks, device) -> torch.Tensor:
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        targets = batch.labels.to(device)[:, 1:]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        with torch.no_grad():
            old = self.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        right = (old.argmax(-1) == targets) & (targets != -100)
        loss = lm
        if right.any():
            loss = loss + self.weight * F.kl_div(F.log_softmax(logits[right], -1), F.log_softmax(old[right], -1),
                                                 log_target=True, reduction="batchmean")
        kept = self.answers(model, device) if self.answers is not None else None
        return loss if kept is None else loss + self.weight * kept

    def state_dict(self) -> dict:
        """Which validation question the answer term reads next (train.StatefulLoss): checkpointed."""
        return {"answers_read": self.answers.position} if self.answers is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.answers is not None:
            self.answers.position = int(state.get("answers_read", 0))

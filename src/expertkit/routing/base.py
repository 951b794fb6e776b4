"""The router interface, its registry, and the prompts routers read.

A router maps prompts to a probability over its labels: the experts it routes
to plus "base" (the last label). Whether the base then answers because the
router said so, or because no expert was confident enough, is decided by the
calibrated threshold (see calibrate.py), not by the router.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from expertkit.encoding import encode_texts
from expertkit.errors import ExpertkitError
from expertkit.library import BASE
from expertkit.registry import Registry
from expertkit.routing.prompt_text import user_text

LABEL_SMOOTHING = 0.05


@dataclass(frozen=True)
class Prompts:
    """The same prompts as text (for lexical routers) and as token ids (for routers that run the model)."""

    texts: list[str]
    ids: list[list[int]]

    @classmethod
    def from_texts(cls, tokenizer, texts: list[str]) -> "Prompts":
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ExpertkitError(f"prompt {empty[0]} is empty; give some text to route")
        return cls(list(texts), encode_texts(tokenizer, list(texts)))

    @classmethod
    def from_ids(cls, tokenizer, rows: list[list[int]]) -> "Prompts":
        """Prompts the model reads; a chat prompt is routed by its last user message (routing/prompt_text.py)."""
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise ExpertkitError(f"row {empty[0]} has no real tokens (attention mask all zero); nothing to route")
        texts, ids = [], []
        for row in rows:
            typed = user_text(tokenizer, row)
            if typed is not None and typed.strip():
                texts.append(typed)
                ids += encode_texts(tokenizer, [typed])
            else:
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
                ids.append(list(row))
        return cls(texts, ids)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: slice) -> "Prompts":
        return Prompts(self.texts[index], self.ids[index])


@dataclass(frozen=True)
class TrainingData:
    """Prompts per label (each expert's domain, and the general corpus for "base" when there is one)."""

    labels: list[str]
    prompts: Prompts
    targets: torch.Tensor  # [N] index into labels

    @classmethod
    def from_texts(cls, tokenizer, labels: list[str], texts_by_label: dict[str, list[str]]) -> "TrainingData":
        texts, targets = [], []
        for i, label in enumerate(labels):
            texts += texts_by_label.get(label, [])
            targets += [i] * len(texts_by_label.get(label, []))
        return cls(labels, Prompts.from_texts(tokenizer, texts), torch.tensor(targets, dtype=torch.long))


class Router(ABC):
    """Probabilities over `labels` (experts..., "base"); state is tensors + JSON so it saves without pickle."""

    kind: ClassVar[str]
    needs_model: ClassVar[bool] = True  # False: routes from text alone, so a routing-only front needs no weights

    def __init__(self, labels: list[str], tensors: dict[str, torch.Tensor], params: dict):
        if labels[-1] != BASE:
            raise ValueError(f"the last label must be '{BASE}', got {labels}")
        self.labels, self.tensors, self.params = list(labels), dict(tensors), dict(params)

    @property
    def experts(self) -> list[str]:
        return self.labels[:-1]

    @classmethod
    @abstractmethod
    def fit(cls, pool, data: TrainingData, settings) -> "Router":
        """Train on labelled prompts; `data.labels` is experts + ["base"], base may have no prompts."""

    @abstractmethod
    def probabilities(self, pool, prompts: Prompts, settings) -> torch.Tensor:
        """[N, len(labels)] rows that sum to 1."""


ROUTERS: Registry[type[Router]] = Registry("router kind")


def register_router(kind: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: `@register_router("lexical")` makes `router train --kind lexical` build this class."""
    return ROUTERS.register(kind, stamp="kind")


def router_kinds() -> list[str]:
    return ROUTERS.names()


def router_class(kind: str) -> type[Router]:
    return ROUTERS.get(kind)


def fit_temperature(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The softmax temperature that best explains the labels (a 1-D grid search: cheap and deterministic).

    Label smoothing keeps the optimum finite when the training prompts are perfectly separable; without
    it every probability would round to 1 and the abstain threshold could not be calibrated.
    """
    grid = torch.logspace(-4, 2, 61, dtype=torch.float64)
    scores = scores.double()
    losses = [torch.nn.functional.cross_entropy(scores / t, targets, label_smoothing=LABEL_SMOOTHING).item()
              for t in grid]
    return float(grid[min(range(len(grid)), key=losses.__getitem__)])


def fit_prior(scores: torch.Tensor, targets: torch.Tensor, temperature: float, steps: int = 100) -> torch.Tensor:
    """[L] log-prior per label, fitted to the labels on top of `scores / temperature` (a label without training
    prompts keeps 0). What makes a score-only router (the likelihood router's losses) learn that some prompts
    belong to the base even when an expert predicts them slightly better: the prior of Bayes' rule, learned."""
    logits = scores.double() / temperature
    counts = torch.bincount(targets, minlength=scores.shape[1])
    present = counts > 0
    balance = len(targets) / (present.sum() * counts.clamp(min=1)).double()  # each label weighs the same, however
    bias = torch.zeros(scores.shape[1], dtype=torch.float64, requires_grad=True)  # many prompts it brought
    optimizer = torch.optim.LBFGS([bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits + bias * present, targets, weight=balance,
                                                 label_smoothing=LABEL_SMOOTHING)
        loss.backward()
        return loss

    optimizer.step(closure)
    return (bias.detach() * present).float()


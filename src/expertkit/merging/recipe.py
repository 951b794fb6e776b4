"""A merge recipe: which experts, which method, which parameters, how it is stored. Validated like the config.

A method's parameters are those of its typed signature (merging/methods.py): the recipe refuses any other
one instead of ignoring it, and resolves `normalize` to mergekit's default for the method when not given.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from expertkit.config import Strict, format_validation_error
from expertkit.errors import ExpertkitError
from expertkit.merging.methods import METHOD_FIELDS, METHODS

SPELLING = {"lam": "lambda"}  # what the user writes


class MergeRecipe(Strict):
    method: str = "linear"
    experts: list[str] = Field(min_length=1)
    weights: list[float] | None = Field(None, description="one per expert; default equal")
    lam: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    density: float = Field(1.0, description="share of each ΔW kept by TIES / DARE / pruning / breadcrumbs")
    gamma: float = Field(0.01, ge=0, lt=1, description="breadcrumbs: share of largest entries removed")
    majority_sign: Literal["total", "frequency"] = "total"
    normalize: bool | None = Field(None, description="divide by the sum of the weights (TIES: of those whose sign "
                                                     "agrees, per entry); default: mergekit's for the method")
    seed: int = Field(0, description="DARE's random drop")
    rank: int | None = Field(None, ge=1, description="rank of the merged adapter; default: the smallest rank "
                                                     "within max_error")
    max_error: float = Field(0.01, gt=0, lt=1, description="largest relative reconstruction error of a stored "
                                                           "module; when no rank keeps it, a full model is stored")
    output: Literal["adapter", "model"] = "adapter"

    model_config = Strict.model_config | {"populate_by_name": True}

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown merge method '{method}'; allowed: {METHODS.listing()}")
        return method

    @field_validator("density")
    @classmethod
    def _density_range(cls, density: float) -> float:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        return density

    @model_validator(mode="after")
    def _consistent(self) -> "MergeRecipe":
        if self.weights is not None and len(self.weights) != len(self.experts):
            raise ValueError(f"{len(self.weights)} weights for {len(self.experts)} experts; give one per expert")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("an expert is listed twice")
        takes = METHODS[self.method].parameters
        for name in METHOD_FIELDS:
            if name in self.model_fields_set and name not in takes:
                users = sorted(m for m, method in METHODS.items() if name in method.parameters)
                raise ValueError(f"'{self.method}' does not take {spelled(name)} (its parameters: "
                                 f"{', '.join(map(spelled, takes)) or 'none'}); drop it, or use a method that "
                                 f"takes it: {', '.join(users)}")
        if {"rank", "max_error"} <= self.model_fields_set:
            raise ValueError("give rank or max_error, not both: rank fixes the adapter's rank, max_error lets "
                             "expertkit choose the smallest rank within it")
        weights = self.expert_weights()
        if self.parameters().get("normalize") and abs(sum(weights)) <= 1e-6 * sum(map(abs, weights)):
            raise ValueError(f"weights {weights} sum to 0, and {self.method} with normalize divides by their sum; "
                             "give weights with a non-zero sum, or set normalize to false (--no-normalize)")
        return self

    def expert_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.experts)

    def parameters(self) -> dict:
        """The method's own parameters (field names), `normalize` resolved to mergekit's default if not given."""
        method = METHODS[self.method]
        values = {name: getattr(self, name) for name in method.parameters}
        if "normalize" in values and values["normalize"] is None:
            values["normalize"] = method.normalize_default()
        return values

    def describe(self) -> dict:
        """What was merged, as `make_recipe` accepts it back: only the fields that apply to this method."""
        storage = {"rank": self.rank} if self.rank is not None else {"max_error": self.max_error}
        return {"method": self.method, "experts": list(self.experts), "weights": self.expert_weights(),
                **{spelled(k): v for k, v in self.parameters().items()}, **storage, "output": self.output}


def spelled(field: str) -> str:
    return SPELLING.get(field, field)


def make_recipe(**fields) -> MergeRecipe:
    """Validate a recipe; a bad field is one ExpertkitError naming it."""
    try:
        return MergeRecipe.model_validate(fields)
    except ValidationError as e:
        raise ExpertkitError(format_validation_error(e, "merge recipe")) from None


def merge_module(deltas: list[torch.Tensor], recipe: MergeRecipe, module_index: int) -> torch.Tensor:
    """Merge one module's ΔWs; random methods draw from a seed of their own per module (reproducible)."""
    method = METHODS[recipe.method]
    parameters = recipe.parameters()
    arguments = {name: parameters[name] for name in method.arguments}
    weights = recipe.expert_weights()
    if not method.random:
        return method.merge(deltas, weights, **arguments)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(parameters["seed"] * 100_003 + module_index)
        return method.merge(deltas, weights, **arguments)

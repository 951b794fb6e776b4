"""A merge recipe: which experts, which method, which parameters. Validated like the project config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from expertkit.config import Strict, format_validation_error
from expertkit.errors import ExpertkitError


class MergeRecipe(Strict):
    method: str
    experts: list[str] = Field(min_length=1)
    weights: list[float] | None = Field(None, description="one per expert; default equal")
    lam: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    density: float = Field(1.0, description="share of each ΔW kept by TIES / DARE / pruning / breadcrumbs")
    gamma: float = Field(0.01, ge=0, lt=1, description="breadcrumbs: share of largest entries removed")
    majority_sign: Literal["total", "frequency"] = "total"
    seed: int = 0
    rank: int | None = Field(None, ge=1, description="rank of the merged adapter; default sum of input ranks")
    output: Literal["adapter", "model"] = "adapter"

    model_config = Strict.model_config | {"populate_by_name": True}

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from expertkit.merging.methods import METHODS

        if method not in METHODS:
            raise ValueError(f"unknown merge method '{method}'; allowed: {', '.join(sorted(METHODS))}")
        return method

    @field_validator("density")
    @classmethod
    def _density_range(cls, density: float) -> float:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        return density

    @model_validator(mode="after")
    def _weights_match(self) -> "MergeRecipe":
        if self.weights is not None and len(self.weights) != len(self.experts):
            raise ValueError(f"{len(self.weights)} weights for {len(self.experts)} experts; give one per expert")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("an expert is listed twice")
        return self

    def expert_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.experts)

    def describe(self) -> dict:
        return self.model_dump(by_alias=True)


def make_recipe(**fields) -> MergeRecipe:
    """Validate a recipe; a bad field is one ExpertkitError naming it."""
    try:
        return MergeRecipe.model_validate(fields)
    except ValidationError as e:
        raise ExpertkitError(format_validation_error(e, "merge recipe")) from None

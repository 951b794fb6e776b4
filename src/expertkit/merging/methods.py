"""The merge methods, registered by name. The arithmetic is the field's tested code, not ours:

- task arithmetic, TIES, DARE (linear and TIES), magnitude pruning: `peft.utils.merge_utils`
  (DARE rescales kept entries by 1/density, as in the paper);
- Model Breadcrumbs: mergekit's in-memory `merge_tensors` (method "breadcrumbs"), which PEFT lacks.

Each function gets the experts' ΔW tensors for one module, their weights, and the recipe, and returns the
merged ΔW. A new method is one decorated function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from peft.utils import merge_utils

from expertkit.merging.recipe import MergeRecipe


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[[list[torch.Tensor], torch.Tensor, MergeRecipe], torch.Tensor]
    uses: tuple[str, ...]  # recipe fields the method reads (the search varies these)
    random: bool = False


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, uses: tuple[str, ...] = (), random: bool = False):
    def wrap(fn):
        METHODS[name] = MergeMethod(name, fn, uses, random)
        return fn

    return wrap


@merge_method("linear", uses=("lam",))
def linear(deltas, weights, recipe):
    """Weighted average, λ · Σ w_i ΔW_i / Σ w_i (λ = 1: the plain average)."""
    return recipe.lam * merge_utils.task_arithmetic(deltas, weights / weights.sum())


@merge_method("task_arithmetic", uses=("lam",))
def task_arithmetic(deltas, weights, recipe):
    """λ · Σ w_i ΔW_i."""
    return recipe.lam * merge_utils.task_arithmetic(deltas, weights)


@merge_method("ties", uses=("lam", "density"))
def ties(deltas, weights, recipe):
    """Trim to top-density magnitudes, elect the sign, average the agreeing entries."""
    return recipe.lam * merge_utils.ties(deltas, weights, recipe.density, recipe.majority_sign)


@merge_method("dare_linear", uses=("lam", "density"), random=True)
def dare_linear(deltas, weights, recipe):
    """Drop entries at random (keep `density`), rescale by 1/density, weighted sum."""
    return recipe.lam * merge_utils.dare_linear(deltas, weights, recipe.density)


@merge_method("dare_ties", uses=("lam", "density"), random=True)
def dare_ties(deltas, weights, recipe):
    """DARE's random drop + rescale, then TIES sign election."""
    return recipe.lam * merge_utils.dare_ties(deltas, weights, recipe.density, recipe.majority_sign)


@merge_method("magnitude_prune", uses=("lam", "density"))
def magnitude_prune(deltas, weights, recipe):
    """Keep each ΔW's top-density magnitudes, weighted sum."""
    return recipe.lam * merge_utils.magnitude_prune(deltas, weights, recipe.density)


@merge_method("breadcrumbs", uses=("lam", "density", "gamma"))
def breadcrumbs(deltas, weights, recipe):
    """Drop the top-gamma outliers and the smallest entries (keep `density`), weighted sum (mergekit)."""
    from mergekit.merge_methods.api import merge_tensors

    zero = torch.zeros_like(deltas[0])
    return merge_tensors([zero, *deltas], "breadcrumbs", base_index=0, parameters={
        "weight": weights.tolist(), "density": recipe.density, "gamma": recipe.gamma, "lambda": recipe.lam})


def merge_module(deltas: list[torch.Tensor], recipe: MergeRecipe, module_index: int) -> torch.Tensor:
    """Merge one module's ΔWs; random methods draw from a seed of their own per module (reproducible)."""
    method = METHODS[recipe.method]
    weights = torch.tensor(recipe.expert_weights(), dtype=deltas[0].dtype)
    if not method.random:
        return method.merge(deltas, weights, recipe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed * 100_003 + module_index)
        return method.merge(deltas, weights, recipe)

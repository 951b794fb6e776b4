"""The merge methods, registered by name. The arithmetic is mergekit's, not ours:

each method runs one of mergekit's own merges on the experts' ΔW tensors (a zero base, so mergekit's task
vectors are the ΔWs), so weights, sign consensus and `normalize` mean exactly what they mean in a mergekit
YAML, and `normalize` defaults to mergekit's default for that method. The one departure, said where it is:
DARE rescales the kept entries by 1/density, as the paper does (mergekit's `rescale` matches L1 norms).

A method's parameters are its keyword-only, typed signature; a recipe may set those and no others.
A new method is one decorated function.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Literal

import torch

from expertkit.registry import Registry

Sign = Literal["total", "frequency"]
# every parameter a merge method may take (each is a MergeRecipe field; the rest of a recipe applies to every merge)
METHOD_FIELDS = ("lam", "density", "gamma", "majority_sign", "normalize", "seed")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[..., torch.Tensor]  # (ΔWs, weights, *, its parameters) -> merged ΔW
    mergekit: str  # the mergekit method it follows: its `normalize` default is this method's
    random: bool = False  # draws from torch's RNG: takes a `seed` too

    @cached_property
    def arguments(self) -> tuple[str, ...]:
        """The keyword-only parameters of `merge`: what the method takes."""
        return tuple(p.name for p in inspect.signature(self.merge).parameters.values() if p.kind is p.KEYWORD_ONLY)

    @property
    def parameters(self) -> tuple[str, ...]:
        """The recipe fields this method reads (the search varies these; the recipe refuses the others)."""
        return self.arguments + (("seed",) if self.random else ())

    def normalize_default(self) -> bool:
        from mergekit import merge_methods

        spec = merge_methods.get(self.mergekit).spec
        return next(p.default for p in spec.parameters if p.name == "normalize")


METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(name: str, mergekit: str, random: bool = False):
    def wrap(fn):
        method = MergeMethod(name, fn, mergekit, random)
        unknown = set(method.arguments) - set(METHOD_FIELDS)
        if unknown:  # a programming error, caught at import
            raise TypeError(f"merge method '{name}' takes {sorted(unknown)}, which are not in METHOD_FIELDS "
                            "(add them there and to MergeRecipe)")
        METHODS.add(name, method)
        return fn

    return wrap


def mergekit_merge(name: str, deltas: list[torch.Tensor], weights: list[float], sign: Sign | None = None,
                   **parameters) -> torch.Tensor:
    """mergekit's method `name` over the ΔWs; `sign` picks its sign consensus (total: TIES' sum, or count)."""
    from mergekit import merge_methods
    from mergekit.merge_methods.api import merge_tensors
    from mergekit.merge_methods.base import BasePolicy
    from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod

    method = merge_methods.get(name)
    if sign is not None:
        consensus = {"total": ConsensusMethod.sum, "frequency": ConsensusMethod.count}[sign]
        method = dataclasses.replace(method, consensus_method=consensus)
    if method.spec.contract.base is BasePolicy.IGNORED:  # linear: a weighted mean of the inputs themselves
        return merge_tensors(deltas, method, parameters={"weight": weights, **parameters})
    zero = torch.zeros_like(deltas[0])
    return merge_tensors([zero, *deltas], method, base_index=0, parameters={"weight": weights, **parameters})


@merge_method("linear", mergekit="linear")
def linear(deltas, weights, *, lam: float, normalize: bool):
    """λ · Σ w_i ΔW_i / Σ w_i (λ = 1: the weighted average; normalize=false: the weighted sum)."""
    return lam * mergekit_merge("linear", deltas, weights, normalize=normalize)


@merge_method("task_arithmetic", mergekit="task_arithmetic")
def task_arithmetic(deltas, weights, *, lam: float, normalize: bool):
    """λ · Σ w_i ΔW_i (normalize=true: divided by Σ w_i)."""
    return mergekit_merge("task_arithmetic", deltas, weights, normalize=normalize, **{"lambda": lam})


@merge_method("ties", mergekit="ties")
def ties(deltas, weights, *, lam: float, density: float, majority_sign: Sign, normalize: bool):
    """Trim each ΔW to its top-density magnitudes, elect the sign of Σ w_i ΔW_i, sum the agreeing w_i ΔW_i
    (normalize: divided by the sum of the agreeing weights)."""
    return mergekit_merge("ties", deltas, weights, majority_sign, density=density, normalize=normalize,
                          **{"lambda": lam})


@merge_method("dare_linear", mergekit="dare_linear", random=True)
def dare_linear(deltas, weights, *, lam: float, density: float, normalize: bool):
    """Drop entries at random (keep `density`), rescale by 1/density, weighted sum."""
    return mergekit_merge("dare_linear", deltas, weights, density=density, normalize=normalize, rescale=False,
                          **{"lambda": lam}) / density


@merge_method("dare_ties", mergekit="dare_ties", random=True)
def dare_ties(deltas, weights, *, lam: float, density: float, majority_sign: Sign, normalize: bool):
    """DARE's random drop and 1/density rescale, then TIES' sign election (a positive scale keeps the signs)."""
    return mergekit_merge("dare_ties", deltas, weights, majority_sign, density=density, normalize=normalize,
                          rescale=False, **{"lambda": lam}) / density


@merge_method("magnitude_prune", mergekit="breadcrumbs")
def magnitude_prune(deltas, weights, *, lam: float, density: float, normalize: bool):
    """Keep each ΔW's top-density magnitudes, weighted sum (mergekit's breadcrumbs with no outliers removed)."""
    return mergekit_merge("breadcrumbs", deltas, weights, density=density, gamma=0.0, normalize=normalize,
                          **{"lambda": lam})


@merge_method("breadcrumbs", mergekit="breadcrumbs")
def breadcrumbs(deltas, weights, *, lam: float, density: float, gamma: float, normalize: bool):
    """Drop the top-gamma outliers and the smallest entries (keep `density`), weighted sum."""
    return mergekit_merge("breadcrumbs", deltas, weights, density=density, gamma=gamma, normalize=normalize,
                          **{"lambda": lam})

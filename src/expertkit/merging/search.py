"""`merge --search`: choose method and parameters on validation data under a time budget.

First a small grid over every registered method (the settings the merging papers
recommend), then an evolutionary refinement (mutate λ, density and the per-expert
weights of one of the best few recipes so far), as mergekit-evolve does with CMA-ES,
until the budget is spent. A trial applies the merged ΔW to the base weights in
place, scores it, and restores the weights, so no files are written. Trials are
jobs of an executor, so a Ray cluster scores as many at once as it has slots.

Trials are ranked by mean log-perplexity, but a recipe worse than the base on any
validation domain ranks after every recipe that is not: a merge that loses what the
base already did on one domain is a regression its users see, whatever the mean says.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from expertkit.compose.adapters import AdapterComposition
from expertkit.evaluate import nll_sum
from expertkit.executors import Context, Executor, Job, LocalExecutor
from expertkit.merging.deltas import expert_deltas
from expertkit.merging.methods import METHODS
from expertkit.merging.recipe import MergeRecipe
from expertkit.progress import console
from expertkit.runtime import BASE_ADAPTER

TOURNAMENT = 3  # children are mutated from one of the best few trials, not only the best
GRID = {
    "linear": [{}, {"lam": 1.5}],
    "task_arithmetic": [{"lam": 0.5}, {"lam": 1.0}],
    "ties": [{"density": 0.3, "lam": 1.0}, {"density": 0.6, "lam": 1.0}],
    "dare_linear": [{"density": 0.5, "lam": 0.5}],
    "dare_ties": [{"density": 0.5, "lam": 0.5}, {"density": 0.5, "lam": 1.0}],  # a sum: λ 1 adds every ΔW whole
    "magnitude_prune": [{"density": 0.5, "lam": 0.5}],
    "breadcrumbs": [{"density": 0.8, "gamma": 0.01, "lam": 0.5}],
}


@dataclass
class Trial:
    recipe: MergeRecipe
    ppl: dict[str, float]
    regressions: tuple[str, ...] = ()  # validation domains where this recipe is worse than the base

    @property
    def score(self) -> float:
        """Mean log-perplexity over the validation domains (lower is better)."""
        return sum(math.log(p) for p in self.ppl.values()) / len(self.ppl)

    @property
    def rank(self) -> tuple[bool, float]:
        """Sort key: recipes that keep the base's level on every domain first, then by score."""
        return bool(self.regressions), self.score


def regressions(ppl: dict[str, float], base_ppl: dict[str, float]) -> tuple[str, ...]:
    """The domains on which `ppl` is worse than the base's."""
    return tuple(d for d, p in ppl.items() if p > base_ppl[d])


@dataclass
class SearchResult:
    best: Trial
    base_ppl: dict[str, float]
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0


def _module_weight(model, module: str) -> torch.Tensor:
    layer = model.get_submodule(module)
    return getattr(layer, "base_layer", layer).weight


@contextmanager
def applied(pool, merged: dict[str, torch.Tensor]):
    """The base weights with the merged ΔW added, restored exactly afterwards."""
    saved = {}
    with torch.no_grad():
        for module, delta in merged.items():
            weight = _module_weight(pool.base.model, module)
            saved[module] = weight.detach().clone()
            weight.add_(delta.to(weight.device, weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, original in saved.items():
                _module_weight(pool.base.model, module).copy_(original)


def validation_ppl(pool, blocks_by_domain, batch_size: int) -> dict[str, float]:
    base = AdapterComposition(pool, BASE_ADAPTER, "trial")
    out = {}
    for domain, blocks in blocks_by_domain.items():
        total, count = 0.0, 0
        for i in range(0, len(blocks), batch_size):
            t, c = nll_sum(base, blocks.take(slice(i, i + batch_size)))
            total, count = total + t, count + c
        out[domain] = math.exp(total / max(count, 1))
    return out


def _grid(experts: list[str], seed: int):
    for method in METHODS:
        seeded = {"seed": seed} if "seed" in METHODS[method].parameters else {}
        for params in GRID.get(method, [{}]):
            yield MergeRecipe(method=method, experts=experts, **seeded, **params)


def _mutate(recipe: MergeRecipe, rng: random.Random) -> MergeRecipe:
    uses = METHODS[recipe.method].parameters
    changes: dict = {"weights": [w * math.exp(rng.gauss(0, 0.25)) for w in recipe.expert_weights()]}
    if "lam" in uses:
        changes["lam"] = min(3.0, recipe.lam * math.exp(rng.gauss(0, 0.25)))
    if "density" in uses:
        changes["density"] = min(1.0, max(0.05, recipe.density + rng.gauss(0, 0.1)))
    return recipe.model_copy(update=changes)


@dataclass
class TrialState:
    """What every trial of a search shares in a process: the pool, the experts' ΔW, the validation blocks."""

    pool: object
    deltas: dict
    valid_blocks: dict
    batch_size: int


def trial_state(pool, experts: list[str], valid_blocks: dict, batch_size: int) -> TrialState:
    return TrialState(pool, expert_deltas(pool, experts), valid_blocks, batch_size)


def score_base(_, state: TrialState, advance) -> dict[str, float]:
    """The base's own validation perplexity: the level no merged recipe should fall below on any domain."""
    return validation_ppl(state.pool, state.valid_blocks, state.batch_size)


def run_trial(recipe: MergeRecipe, state: TrialState, advance) -> dict[str, float]:
    """One trial: validation perplexity per domain of the base with this recipe's merged ΔW added."""
    from expertkit.merging import merge_deltas

    with applied(state.pool, merge_deltas(state.deltas, recipe)):
        return validation_ppl(state.pool, state.valid_blocks, state.batch_size)


def search(experts: list[str], context: Context, budget_seconds: float, seed: int = 0,
           executor: Executor | None = None) -> SearchResult:
    """Grid then evolution until `budget_seconds`; returns the best trial and the history.

    Trials run as jobs of `executor` (`context` builds a TrialState per worker), `executor.slots`
    at a time: the grid in chunks, then generations of that many children. With one slot (the
    local executor) this is a (1+1) evolution, trial after trial.
    """
    executor = executor or LocalExecutor()
    started = time.time()
    rng = random.Random(seed)
    result: SearchResult | None = None
    base_ppl = executor.map(score_base, [Job("merge search: the base", None)], context)[0]

    def record(job: Job, ppl: dict[str, float]) -> None:
        nonlocal result
        trial = Trial(job.payload, ppl, regressions(ppl, base_ppl))
        if result is None:
            result = SearchResult(trial, base_ppl)
        result.trials.append(trial)
        if trial.rank < result.best.rank:
            result.best = trial
        worse = f" worse than the base on {', '.join(trial.regressions)}" if trial.regressions else ""
        console.print(f"  trial {len(result.trials):>3} {trial.recipe.method:<16} score {trial.score:.4f}{worse} "
                      f"(best {result.best.recipe.method} {result.best.score:.4f}) {time.time() - started:.0f}s",
                      highlight=False)

    def run(recipes: list[MergeRecipe]) -> None:
        executor.map(run_trial, [Job(f"merge trial {r.method}", r) for r in recipes], context, on_result=record)

    grid, slots = list(_grid(experts, seed)), executor.slots
    for i in range(0, len(grid), slots):
        if result is not None and time.time() - started > budget_seconds:
            break
        run(grid[i:i + slots])
    while time.time() - started < budget_seconds:
        parents = sorted(result.trials, key=lambda t: t.rank)[:TOURNAMENT]
        run([_mutate(rng.choice(parents).recipe, rng) for _ in range(slots)])
    result.seconds = time.time() - started
    return result

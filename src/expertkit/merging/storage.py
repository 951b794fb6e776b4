"""How a merged ΔW is stored, so that what is saved is what was merged (and ranked, by `merge --search`).

Sparsifying merges (TIES, DARE, breadcrumbs, pruning) give full-rank ΔWs, and a fixed LoRA rank can lose tens
of percent of them. So by default the adapter gets the smallest rank that keeps every module's relative
reconstruction error within the recipe's `max_error`; when no rank up to full does, the full model is stored.
The choice and the stored error go to the entry's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from expertkit.library import Kind
from expertkit.merging.export import full_model, lora_factors, smallest_rank, write_adapter, write_full_model
from expertkit.merging.recipe import MergeRecipe

NO_RANK = "no rank up to full is within max_error"


@dataclass
class Stored:
    kind: str  # library entry kind
    write: Callable  # write(folder): the files, already computed and checked finite
    errors: dict[str, float]  # per module: relative Frobenius error of the stored ΔW
    record: dict  # for the manifest: stored_as, rank, chosen_by, bound, max/mean error


def _record(stored_as: str, rank: int | None, chosen_by: str, bound: float | None, errors: dict) -> dict:
    values = list(errors.values()) or [0.0]
    return {"stored_as": stored_as, "rank": rank, "chosen_by": chosen_by, "bound": bound,
            "max_relative_error": max(values), "mean_relative_error": sum(values) / len(values)}


def store(merged: dict[str, torch.Tensor], recipe: MergeRecipe, base_path: str, template_config: dict) -> Stored:
    """Compute what to write (nothing is written here): an adapter within the bound, else the full model."""
    if recipe.output == "adapter":
        if recipe.rank:
            rank, chosen_by, bound = recipe.rank, "recipe rank", None
        else:
            rank, chosen_by, bound = smallest_rank(merged, recipe.max_error), "max_error", recipe.max_error
        config, tensors, errors = lora_factors(merged, rank, template_config)
        if bound is None or max(errors.values(), default=0.0) <= bound:
            return Stored(Kind.MERGE, lambda folder: write_adapter(folder, config, tensors), errors,
                          _record("adapter", rank, chosen_by, bound, errors))
        chosen_by = NO_RANK  # a bound below what float32 factors hold, even at full rank: store the full model
    else:
        chosen_by, bound = "recipe output", None
    model, errors = full_model(base_path, merged)
    return Stored(Kind.MERGED_MODEL, partial(write_full_model, base_path=base_path, model=model), errors,
                  _record("model", None, chosen_by, bound, errors))


def describe_storage(record: dict, modules: int) -> str:
    """One line for the CLI: what was stored, why, and how far it is from the exact merge."""
    bound, chosen_by = record["bound"], record["chosen_by"]
    why = (f"the smallest rank within max_error {bound:.2g}" if chosen_by == "max_error"
           else f"no adapter rank keeps max_error {bound:.2g}" if chosen_by == NO_RANK else "as asked")
    what = f"adapter rank {record['rank']}" if record["stored_as"] == "adapter" else "full model"
    return (f"{what} ({why}): relative error of the stored ΔW max {record['max_relative_error']:.2e}, "
            f"mean {record['mean_relative_error']:.2e} over {modules} modules")

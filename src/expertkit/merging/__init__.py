"""Merge library experts into one LoRA adapter or one full model.

Merges act on each module's real update ΔW = scale · B · A (never on A and B
separately, which is a different function), with the methods of
merging/methods.py; the merged ΔW is stored as merging/storage.py decides: a
truncated-SVD adapter at the smallest rank within the recipe's error bound, or
the full model, after checking that every tensor is finite.
"""

from __future__ import annotations

import torch

from expertkit.errors import ExpertkitError
from expertkit.library import Entry, Library
from expertkit.merging.deltas import check_mergeable, expert_deltas
from expertkit.merging.export import require_finite
from expertkit.merging.methods import METHODS
from expertkit.merging.recipe import MergeRecipe, make_recipe, merge_module
from expertkit.merging.storage import describe_storage, store

__all__ = ["METHODS", "MergeRecipe", "describe_storage", "make_recipe", "merge_deltas", "merge_experts",
           "merged_deltas"]


def merge_deltas(deltas: dict[str, dict[str, torch.Tensor]], recipe: MergeRecipe) -> dict[str, torch.Tensor]:
    """{module: {expert: ΔW}} -> {module: merged ΔW}."""
    return {module: merge_module([by_expert[e] for e in recipe.experts], recipe, i)
            for i, (module, by_expert) in enumerate(sorted(deltas.items()))}


def merged_deltas(pool, recipe: MergeRecipe) -> dict[str, torch.Tensor]:
    return merge_deltas(expert_deltas(pool, recipe.experts), recipe)


def merge_experts(pool, library: Library, recipe: MergeRecipe, name: str, overwrite: bool = False,
                  extra_manifest: dict | None = None) -> tuple[Entry, dict]:
    """Merge, check, choose the storage, then write the library entry (atomically); return it with a report."""
    if not overwrite and library.has_name(name):
        raise ExpertkitError(f"the library already has an entry named '{name}'; pick another --name or pass --force")
    merged = merged_deltas(pool, recipe)
    require_finite(merged, f"the {recipe.method} merge of {', '.join(recipe.experts)}")
    stored = store(merged, recipe, pool.base.name, check_mergeable(library.get(recipe.experts[0])))
    manifest = {"method": recipe.method, "parameters": recipe.describe(), "parents": list(recipe.experts),
                "reconstruction": stored.record, **(extra_manifest or {})}
    entry = library.add_entry(stored.kind, name, stored.write, manifest, overwrite=overwrite)
    return entry, {"modules": len(merged), **stored.record, "relative_error": stored.errors}

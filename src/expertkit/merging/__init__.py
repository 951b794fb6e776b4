"""Merge library experts into one LoRA adapter or one full model.

Merges act on each module's real update ΔW = scale · B · A (never on A and B
separately, which is a different function), with the methods of
merging/methods.py; the merged ΔW is re-factored to rank r by truncated SVD,
lossless for linear merges at r = sum of the input ranks.
"""

from __future__ import annotations

import torch

from expertkit.errors import ExpertkitError
from expertkit.library import Entry, Library
from expertkit.merging.deltas import check_mergeable, expert_deltas, total_rank
from expertkit.merging.export import lora_factors, write_adapter, write_full_model
from expertkit.merging.methods import METHODS, merge_module
from expertkit.merging.recipe import MergeRecipe, make_recipe

__all__ = ["METHODS", "MergeRecipe", "make_recipe", "merge_deltas", "merge_experts", "merged_deltas"]


def merge_deltas(deltas: dict[str, dict[str, torch.Tensor]], recipe: MergeRecipe) -> dict[str, torch.Tensor]:
    """{module: {expert: ΔW}} -> {module: merged ΔW}."""
    return {module: merge_module([by_expert[e] for e in recipe.experts], recipe, i)
            for i, (module, by_expert) in enumerate(sorted(deltas.items()))}


def merged_deltas(pool, recipe: MergeRecipe) -> dict[str, torch.Tensor]:
    return merge_deltas(expert_deltas(pool, recipe.experts), recipe)


def merge_experts(pool, library: Library, recipe: MergeRecipe, name: str, overwrite: bool = False,
                  extra_manifest: dict | None = None) -> tuple[Entry, dict]:
    """Merge, write the result as a library entry (atomically), and return it with a report."""
    if not overwrite and library.has_name(name):
        raise ExpertkitError(f"the library already has an entry named '{name}'; pick another --name or pass --force")
    merged = merged_deltas(pool, recipe)
    manifest = {"method": recipe.method, "parameters": recipe.describe(), "parents": list(recipe.experts),
                **(extra_manifest or {})}
    report: dict = {"modules": len(merged)}
    if recipe.output == "adapter":
        rank = recipe.rank or total_rank(pool, recipe.experts)
        config, tensors, errors = lora_factors(merged, rank, check_mergeable(library.get(recipe.experts[0])))
        values = list(errors.values())
        report.update(rank=rank, max_relative_error=max(values), mean_relative_error=sum(values) / len(values))
        manifest["reconstruction"] = dict(report)
        report["relative_error"] = errors
        entry = library.add_entry("merge", name, lambda folder: write_adapter(folder, config, tensors), manifest,
                                  overwrite=overwrite)
    else:
        entry = library.add_entry("merged_model", name,
                                  lambda folder: write_full_model(folder, pool.base.name, merged), manifest,
                                  overwrite=overwrite)
    return entry, report

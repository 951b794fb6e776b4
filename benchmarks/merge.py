"""Suite `merge`: every merge method over all domain experts, plus a searched recipe, on the test splits.

Reuses the cached base and experts of `specialize`. Acceptance: the best merge beats the base on every
domain; its gap to each domain's own expert is reported.
"""

from __future__ import annotations

import math
from pathlib import Path

from common import GENERAL, config_experts, suite_config
from suites import MICRO, REAL_BASES, suite

# One setting per method, from the ranges the papers recommend (fixed, so runs compare). The methods whose
# mergekit default is a weighted sum, not a mean (normalize false: all but linear and ties), take λ 0.5; at λ 1.0
# dare_ties adds the micro suite's five ΔWs whole (4x one expert's norm): 1.9-6.3x the base's perplexity.
RECIPES = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.5, "lambda": 1.0},
    "dare_linear": {"density": 0.5, "lambda": 0.5},
    "dare_ties": {"density": 0.5, "lambda": 0.5},
    "magnitude_prune": {"density": 0.5, "lambda": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.01, "lambda": 0.5},
}
SEARCH_BUDGET_SECONDS = 240
LOSSLESS = 1e-4  # relative reconstruction error below which the rank-r adapter is the exact merge


@suite("merge", bases=(MICRO, *REAL_BASES))
def run(data: Path, device: str | None, base: str = MICRO) -> dict:
    from expertkit.library import Library
    from expertkit.merging import make_recipe, merge_experts
    from expertkit.runtime import ExpertPool
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base, run_merge_search, run_scorecard

    cfg, model = load_project_base(suite_config(data, base), device)
    train_all(cfg, model)
    library = Library(cfg.library)
    experts = config_experts(cfg, library)
    pool = ExpertPool(model, library)
    reconstruction, full_models = {}, []
    for method, params in RECIPES.items():
        recipe = make_recipe(method=method, experts=experts, **params)
        _, report = merge_experts(pool, library, recipe, f"merge-{method}", overwrite=True)
        reconstruction[method] = {k: report[k] for k in ("rank", "max_relative_error", "mean_relative_error")}
        if report["max_relative_error"] > LOSSLESS:  # sparsified ΔW is full rank: also score the exact merge
            merge_experts(pool, library, recipe.model_copy(update={"output": "model"}), f"merge-{method}-model",
                          overwrite=True)
            full_models.append(method)
    searched = run_merge_search(cfg, model, experts, "merge-searched", SEARCH_BUDGET_SECONDS, overwrite=True)
    entries = {m: f"merge-{m}" for m in RECIPES}  # the table's label of each merge -> its library entry
    entries.update({f"{m} (full model)": f"merge-{m}-model" for m in full_models}, searched="merge-searched")
    card = run_scorecard(cfg, model, out=Path(cfg.library).parent / (Path(cfg.library).name + "-merge-scorecard"),
                         names=["base", *experts, *entries.values()])
    ppl = card["ppl"]
    domains = list(ppl["base"])
    merges = {label: ppl[entry] for label, entry in entries.items()}
    best = min(merges, key=lambda m: sum(math.log(v) for v in merges[m].values()))  # geometric mean over domains
    oracle = {d: ppl[d][d] if d in ppl else ppl["base"][d] for d in domains}
    result = {
        "base_model": base, "base": ppl["base"], "experts": {e: ppl[e] for e in experts},
        "merges": {m: merges[m] for m in RECIPES},
        "merges_full_model": {m: merges[f"{m} (full model)"] for m in full_models},
        "search": {"recipe": searched["recipe"], **ppl["merge-searched"], "validation_ppl": searched["validation_ppl"],
                   "base_validation_ppl": searched["base_validation_ppl"],
                   "worse_than_base_on": searched["worse_than_base_on"],
                   "trials": searched["trials"], "seconds": round(searched["seconds"], 1)},
        "reconstruction": reconstruction, "best_merge": best,
        "best_merge_entry": entries[best], "best_merge_recipe": library.get(entries[best]).manifest["parameters"],
        "best_beats_base_everywhere": all(merges[best][d] < ppl["base"][d] for d in domains),
        "best_gap_to_expert": {d: merges[best][d] / oracle[d] - 1 for d in domains if d != GENERAL},
    }
    print(f"\n{'composition':<36}" + "".join(f"{d:>11}" for d in domains))
    rows = [("base", ppl["base"]), ("expert (own domain)", oracle), *((f"merge {m}", merges[m]) for m in merges)]
    for name, row in rows:
        print(f"{name:<36}" + "".join(f"{row[d]:>11.2f}" for d in domains))
    print(f"\nsearched recipe: {searched['recipe']}")
    print(f"best merge: {best}; beats base on every domain: {result['best_beats_base_everywhere']}")
    print("gap of the best merge to each domain's own expert: "
          + ", ".join(f"{d} {g:+.1%}" for d, g in result["best_gap_to_expert"].items()))
    return result

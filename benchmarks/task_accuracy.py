"""Suite `tasks`: task accuracy (lm-evaluation-harness) of the base, the experts, the best merge and the best router.

Every composition on the six general tasks of ../shared/tasks and the two domain tasks beside the corpora,
--task-examples each (500 by default; all of a task when it has fewer), through expertkit's lm-eval model. Then the real-client
cross-check: on one expert, expertkit's model and lm-eval's own `hf` model with `peft=EXPERT_DIR` on the
same arc_easy and piqa requests: acc and acc_norm, the largest per-request log-likelihood difference, and
requests per second side by side.

Micro: the specialize suite's base and experts, the merge suite's best merge (its entry and recipe, made here if
missing) and the library's best router. A real base: the base alone, plus the specialize suite's experts
when that suite has trained them (cached).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import ROOT, config_experts, suite_config
from suites import MICRO, REAL_BASES, TASK_EXAMPLES, suite

CROSS_CHECK_TASKS = ("arc_easy", "piqa")
CROSS_CHECK_EXAMPLES = 200
CROSS_CHECK_EXPERT = "medical"
FORGETTING_LIMIT = -1.0  # points
# Published zero-shot lm-eval figures of SmolLM2-135M-Instruct (full-precision weights, full test sets), in points:
# the "Baseline" column of the model card of lldois/SmolLM2-135M-Reasoning-SLERP-Champion on the Hugging Face Hub
# (lm-eval, 0-shot). No published SciQ figure for this model was found. Ours: the 4-bit GGUF, first 500 examples.
PUBLISHED = {"smollm2-135m": {
    "source": "lldois/SmolLM2-135M-Reasoning-SLERP-Champion model card, Baseline column (lm-eval 0-shot)",
    "hellaswag": ("acc_norm", 42.99), "piqa": ("acc_norm", 66.92), "arc_easy": ("acc", 54.12),
    "arc_challenge": ("acc_norm", 27.73)}}


@suite("tasks", bases=(MICRO, *REAL_BASES))
def run(data: Path, device: str | None, base: str = MICRO) -> dict:
    from expertkit.library import Kind, Library
    from expertkit.tasks.run import summarize, task_metrics
    from expertkit.workflow import load_project_base, run_task_scorecard

    cfg = suite_config(data, base)
    cfg, model = load_project_base(cfg, device)
    library = Library(cfg.library)
    names = ["base"]
    if library.exists():
        names += [e.name for e in library.entries(Kind.EXPERT)]
        if base == MICRO:
            names += [_best_merge(cfg, model, library), _best_router(library)]
    out = Path(cfg.library).parent / (Path(cfg.library).name + "-tasks")
    card = run_task_scorecard(cfg, model, ["general", "domain"], out=out, names=names,
                              limit=TASK_EXAMPLES["per_task"])
    result = {"base_model": base, "compositions": names, "examples_per_task": TASK_EXAMPLES["per_task"],
              "rows": card["rows"], "forgetting": card["forgetting"],
              "forgetting_interval": card["forgetting_interval"], "domain_skill": card["domain_skill"],
              "domain_skill_acc_norm": summarize(card["rows"], {e: e for e in card["forgetting"]},
                                                 metric="acc_norm")["domain_skill"],
              "task_metrics": task_metrics(card["rows"]), "references": card["references"],
              "checks": {"forgetting": {e: f >= FORGETTING_LIMIT for e, f in card["forgetting"].items()}}}
    if base != MICRO:
        result["published"] = _published(base, card["rows"])
    expert = CROSS_CHECK_EXPERT if CROSS_CHECK_EXPERT in names else next((n for n in names if n != "base"), None)
    if expert is not None:
        result["cross_check"] = cross_check(cfg, library.get(expert).path, expert)
    _print(result)
    return result


def _best_merge(cfg, model, library) -> str:
    """The merge suite's best merge (its results file names the entry and its recipe), made here when missing."""
    from expertkit.merging import make_recipe, merge_experts
    from expertkit.runtime import ExpertPool

    from merge import RECIPES

    results = ROOT / "benchmarks" / "results" / "merge.json"
    best = json.loads(results.read_text()) if results.is_file() else {"best_merge": "linear"}
    # files written before the suite recorded its best entry and recipe name a fixed recipe
    name = best.get("best_merge_entry", f"merge-{best['best_merge']}")
    recipe = best.get("best_merge_recipe") or {"method": best["best_merge"], **RECIPES[best["best_merge"]],
                                               "experts": config_experts(cfg, library)}
    if not library.has_name(name):
        merge_experts(ExpertPool(model, library), library, make_recipe(**recipe), name)
    return name


def _best_router(library) -> str:
    from expertkit.serve.server import pick_router

    return pick_router(library.entries(), None)


def _published(base: str, rows: list[dict]) -> dict:
    """The base's measured accuracy next to the published figure, per task where one exists."""
    reference = PUBLISHED.get(base, {})
    mine = {r["task"]: r for r in rows if r["composition"] == "base"}
    out = {"source": reference.get("source")}
    for task, (metric, points) in ((t, v) for t, v in reference.items() if t != "source"):
        if task in mine and mine[task][metric] is not None:
            measured = 100 * mine[task][metric]
            out[task] = {"metric": metric, "published": points, "measured": round(measured, 1),
                         "difference": round(measured - points, 1)}
    return out


def cross_check(cfg, expert_dir: Path, expert: str) -> dict:
    """expertkit's lm-eval model vs lm-eval's own hf+peft model on the same requests, one after the other.

    Two passes: one request per batch on both sides (no padding anywhere, so every log-likelihood must
    agree to float32 rounding), then both at the benchmark's batch size for acc, acc_norm and speed.
    """
    out = {"expert": expert, "examples_per_task": CROSS_CHECK_EXAMPLES}
    exact = _side_by_side(cfg, expert_dir, expert, batch_size=1)
    out["unbatched_max_abs_loglikelihood_difference"] = max(t["max_abs_loglikelihood_difference"]
                                                            for t in exact["tasks"].values())
    batched = _side_by_side(cfg, expert_dir, expert, batch_size=cfg.evaluation.batch_size)
    return {**out, **batched, "unbatched": exact}


def _side_by_side(cfg, expert_dir: Path, expert: str, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from expertkit.tasks.lm import ExpertkitLM
    from expertkit.tasks.local import default_data_root, resolve
    from expertkit.tasks.run import task_manager

    specs = resolve(list(CROSS_CHECK_TASKS), default_data_root())
    models = {"expertkit": ExpertkitLM.from_library(cfg.library, model=expert, device="cpu", batch_size=batch_size),
              "hf": HFLM(pretrained=str(cfg.base.path), peft=str(expert_dir), dtype="float32", device="cpu",
                         batch_size=batch_size)}
    runs = {}
    for label, lm in models.items():
        started = time.perf_counter()
        result = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=CROSS_CHECK_EXAMPLES, log_samples=True,
                                         task_manager=task_manager(specs), verbosity="WARNING")
        runs[label] = (time.perf_counter() - started, result)
    mine, other = runs["expertkit"][1], runs["hf"][1]
    out = {"batch_size": batch_size, "tasks": {}}
    requests = 0
    for task in sorted(mine["results"]):
        lls = [float(r[0]) for s in mine["samples"][task] for r in s["filtered_resps"]]
        ref = [float(r[0]) for s in other["samples"][task] for r in s["filtered_resps"]]
        requests += len(lls)
        out["tasks"][task.removesuffix("_local")] = {
            "expertkit": {k: mine["results"][task].get(f"{k},none") for k in ("acc", "acc_norm")},
            "hf": {k: other["results"][task].get(f"{k},none") for k in ("acc", "acc_norm")},
            "requests": len(lls), "max_abs_loglikelihood_difference": max(abs(a - b) for a, b in zip(lls, ref))}
    seconds = {label: runs[label][0] for label in runs}
    out.update(requests=requests, expertkit_seconds=round(seconds["expertkit"], 2), hf_seconds=round(seconds["hf"], 2),
               expertkit_requests_per_s=round(requests / seconds["expertkit"], 1),
               hf_requests_per_s=round(requests / seconds["hf"], 1),
               speed_ratio=round(seconds["hf"] / seconds["expertkit"], 2))
    return out


def _print(result: dict) -> None:
    from expertkit.tasks.run import score, task_metrics

    rows = result["rows"]
    tasks = sorted({r["task"] for r in rows})
    print(f"\n{'composition':<18}" + "".join(f"{t[:11]:>12}" for t in tasks) + f"{'forgetting':>12}")
    metric = task_metrics(rows)
    print(f"{'':<18}" + "".join(f"{metric[t]:>12}" for t in tasks))
    table = {(r["composition"], r["task"]): r for r in rows}
    for name in result["compositions"]:
        cells = [score(table[(name, t)])[0] if (name, t) in table else None for t in tasks]
        f = result["forgetting"].get(name)
        print(f"{name:<18}" + "".join("{:>12}".format("-" if c is None else f"{100 * c:.1f}") for c in cells)
              + ("{:>12}".format("-" if f is None else f"{f:+.1f}")))
    references = result.get("references", {})
    for key, label in (("chance", "(guessing)"), ("most_frequent", "(one answer)")):
        print(f"{label:<18}" + "".join("{:>12}".format(f"{100 * references[t][key]:.1f}" if t in references
                                                      else "-") for t in tasks))
    check = result.get("cross_check")
    if check:
        for task, row in check["tasks"].items():
            print(f"cross-check {task}: expertkit acc {row['expertkit']['acc']:.4f} / acc_norm "
                  f"{row['expertkit']['acc_norm']:.4f}; hf+peft {row['hf']['acc']:.4f} / {row['hf']['acc_norm']:.4f}; "
                  f"max |Δ log-likelihood| {row['max_abs_loglikelihood_difference']:.2e} over {row['requests']}")
        print(f"speed: expertkit {check['expertkit_requests_per_s']} req/s, hf {check['hf_requests_per_s']} req/s "
              f"({check['speed_ratio']:.2f}x); one request per batch: max |Δ log-likelihood| "
              f"{check['unbatched_max_abs_loglikelihood_difference']:.2e}")

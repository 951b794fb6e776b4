"""The scorecard's task table: every composition on every task, forgetting and domain skill vs the base.

Forgetting is what an expert loses on the general tasks (mean change over them, in points, with a 95%
interval from lm-eval's standard errors); domain skill is the change on its own domain's task. Each task is
judged by the metric its shipped config declares (`metadata.expertkit_metric`): acc_norm for the general
benchmarks, the forgetting goal's metric (lm-eval reads HellaSwag, ARC, PIQA and SciQ by it too); acc for the
labeled domain tasks, whose choices are class words, as lm-eval reads such tasks (its pubmedqa reports acc
only). Every row holds both. Each composition's per-request log-likelihoods are cached under its identity
(base weights + entry manifest), so rerunning after one new expert scores only that expert.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

from expertkit.errors import ExpertkitError
from expertkit.progress import console
from expertkit.runtime import Composition
from expertkit.tasks.lm import ExpertkitLM
from expertkit.tasks.local import SUFFIX, local_tasks, task_kinds

METRICS = ("acc", "acc_norm")


def composition_identity(base_identity: dict, manifest: dict | None) -> str:
    """Changes when the base weights or the library entry change, and only then."""
    return hashlib.sha256(json.dumps([base_identity, manifest], sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_on_tasks(compositions: dict[str, tuple[Composition, str]], tokenizer, max_length: int,
                      specs: list, limit: int | None = None, batch_size: int = 16,
                      cache_dir: Path | None = None, per_example: bool = False) -> list[dict]:
    """{name: (composition, identity)} x task specs -> rows {composition, task, metric, acc, acc_norm, ...}.

    `metric` names the row's headline metric (see `headline_metric`). `per_example`: each row also holds
    "correct", that metric (0 or 1) for every example in document order, which flip rates compare.
    """
    import lm_eval

    check_tasks(specs)
    declared = declared_metrics(specs)
    rows = []
    for name, (composition, identity) in compositions.items():
        console.print(f"tasks: {name}", highlight=False)
        cache = None
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            cache = str(cache_dir / f"{name}-{identity}")
        result = lm_eval.simple_evaluate(model=ExpertkitLM(composition, tokenizer, max_length, batch_size),
                                         tasks=specs, limit=limit, task_manager=task_manager(specs),
                                         use_cache=cache, verbosity="WARNING", log_samples=per_example)
        for task, metrics in sorted(result["results"].items()):
            short = task.removesuffix(SUFFIX)
            row = {"composition": name, "task": short,
                   **{m: metrics.get(f"{m},none") for m in METRICS},
                   **{f"{m}_stderr": metrics.get(f"{m}_stderr,none") for m in METRICS},
                   "n": result["n-samples"].get(task, {}).get("effective")}
            row["metric"] = headline_metric(declared.get(short), row)
            if per_example:
                samples = sorted(result["samples"][task], key=lambda sample: sample["doc_id"])
                row["correct"] = [int(sample[row["metric"]]) for sample in samples]
            rows.append(row)
    return rows


def declared_metrics(specs: list) -> dict[str, str]:
    """{task: metric} that the configs among `specs` declare, checked before any model runs."""
    declared = {name.removesuffix(SUFFIX): spec.get("metadata", {}).get("expertkit_metric")
                for name, spec in zip(task_names(specs), specs) if isinstance(spec, dict)}
    declared = {name: metric for name, metric in declared.items() if metric is not None}
    for name, metric in declared.items():
        if metric not in METRICS:
            raise ExpertkitError(f"task '{name}' declares expertkit_metric '{metric}'; use one of {list(METRICS)}")
    return declared


def headline_metric(declared: str | None, row: dict) -> str:
    """The metric a task is judged by: the one its config declares; for a task lm-eval names (none declared),
    acc_norm where lm-eval reports it, else acc."""
    if declared is not None:
        return declared
    return "acc_norm" if row["acc_norm"] is not None else "acc"


def task_metrics(rows: list[dict]) -> dict[str, str]:
    """{task: the metric its rows are read by}, for tables and result files to say which."""
    return {row["task"]: row["metric"] for row in rows}


def score(row: dict, metric: str | None = None) -> tuple[float | None, float]:
    """(accuracy, its standard error) of a row by its headline metric, or by `metric`."""
    metric = metric or row["metric"]
    return row[metric], row[f"{metric}_stderr"] or 0.0


def task_manager(specs: list):
    """lm-eval's task index, built once per process and only when a spec names a task: indexing lm-eval's
    thousands of task files takes seconds, and the shipped tasks come as inline configs that need no index."""
    return _task_index(with_lm_evals_own=any(isinstance(spec, str) for spec in specs))


@functools.cache
def _task_index(with_lm_evals_own: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=with_lm_evals_own)


def check_tasks(specs: list) -> None:
    """Load the tasks once before any model runs: an unknown name is the user's error, said in one line."""
    try:
        task_manager(specs).load(specs)
    except (KeyError, ValueError) as e:  # lm-eval's words for an unknown task name or a bad config
        raise ExpertkitError(f"lm-eval could not load the tasks {task_names(specs)}: {e}; shipped tasks: "
                             f"{sorted(local_tasks())} (or any lm-eval task whose data is reachable)") from None


def task_names(specs: list) -> list[str]:
    return [s["task"] if isinstance(s, dict) else s for s in specs]


def summarize(rows: list[dict], expert_domains: dict[str, str], metric: str | None = None) -> dict:
    """Forgetting (mean change over the general tasks, with its 95% interval) and domain skill, in points,
    each task by its headline metric (or by `metric`, for a second reading of the same rows)."""
    kinds = task_kinds()
    table = {(r["composition"], r["task"]): r for r in rows}
    forgetting, interval, skill = {}, {}, {}
    general = sorted({r["task"] for r in rows if kinds.get(r["task"]) == "general"})
    for expert, domain in expert_domains.items():
        changes = [change_vs_base(table, expert, t, metric) for t in general]
        if general and all(c is not None for c in changes):
            forgetting[expert] = sum(c[0] for c in changes) / len(changes)
            interval[expert] = 1.96 * math.sqrt(sum(c[1] ** 2 for c in changes)) / len(changes)
        own = [t for t in {r["task"] for r in rows} if kinds.get(t) == domain]
        if own and (change := change_vs_base(table, expert, own[0], metric)) is not None:
            skill[expert] = change[0]
    return {"forgetting": forgetting, "forgetting_interval": interval, "domain_skill": skill}


def change_vs_base(table: dict, name: str, task: str, metric: str | None = None) -> tuple[float, float] | None:
    """(change vs the base in points, its standard error) for one task, if both rows exist."""
    mine, base = table.get((name, task)), table.get(("base", task))
    if not mine or not base:
        return None
    (value, error), (base_value, base_error) = score(mine, metric), score(base, metric)
    if value is None or base_value is None:
        return None
    return 100 * (value - base_value), 100 * math.sqrt(error ** 2 + base_error ** 2)

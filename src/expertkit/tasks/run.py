"""The scorecard's task table: every composition on every task, forgetting and domain skill vs the base.

Forgetting is what an expert loses on the general tasks (mean acc_norm change over them, in points, with a
95% interval from lm-eval's standard errors); domain skill is the change on its own domain's task. Each
composition's per-request log-likelihoods are cached under its identity (base weights + entry manifest),
so rerunning after one new expert scores only that expert.
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
from expertkit.tasks.local import SUFFIX, local_tasks, task_kind

METRIC = "acc_norm"


def composition_identity(base_identity: dict, manifest: dict | None) -> str:
    """Changes when the base weights or the library entry change, and only then."""
    return hashlib.sha256(json.dumps([base_identity, manifest], sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_on_tasks(compositions: dict[str, tuple[Composition, str]], tokenizer, max_length: int,
                      specs: list, limit: int | None = None, batch_size: int = 16,
                      cache_dir: Path | None = None, per_example: bool = False) -> list[dict]:
    """{name: (composition, identity)} x task specs -> rows {composition, task, acc, acc_norm, stderr ...}.

    `per_example`: each row also holds "correct", the acc_norm (0 or 1) of every example in document order,
    which is what flip rates between two compositions compare.
    """
    import lm_eval

    check_tasks(specs)
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
            row = {"composition": name, "task": task.removesuffix(SUFFIX),
                   "acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"),
                   "stderr": metrics.get("acc_norm_stderr,none"), "acc_stderr": metrics.get("acc_stderr,none"),
                   "n": result["n-samples"].get(task, {}).get("effective")}
            if per_example:
                samples = sorted(result["samples"][task], key=lambda sample: sample["doc_id"])
                row["correct"] = [int(sample[METRIC]) for sample in samples]
            rows.append(row)
    return rows


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


def summarize(rows: list[dict], expert_domains: dict[str, str]) -> dict:
    """Forgetting (mean change over the general tasks, with its 95% interval) and domain skill, in points."""
    kinds = {name: task_kind(config) for name, config in local_tasks().items()}
    table = {(r["composition"], r["task"]): r for r in rows}
    forgetting, interval, skill = {}, {}, {}
    general = sorted({r["task"] for r in rows if kinds.get(r["task"]) == "general"})
    for expert, domain in expert_domains.items():
        changes = [_change(table, expert, t) for t in general]
        if general and all(c is not None for c in changes):
            forgetting[expert] = sum(c[0] for c in changes) / len(changes)
            interval[expert] = 1.96 * math.sqrt(sum(c[1] ** 2 for c in changes)) / len(changes)
        own = [t for t in {r["task"] for r in rows} if kinds.get(t) == domain]
        if own and (change := _change(table, expert, own[0])) is not None:
            skill[expert] = change[0]
    return {"forgetting": forgetting, "forgetting_interval": interval, "domain_skill": skill}


def _change(table: dict, name: str, task: str) -> tuple[float, float] | None:
    """(acc_norm change vs the base in points, its standard error) for one task, if both rows exist."""
    mine, base = table.get((name, task)), table.get(("base", task))
    if not mine or not base or mine[METRIC] is None or base[METRIC] is None:
        return None
    se = math.sqrt((mine["stderr"] or 0) ** 2 + (base["stderr"] or 0) ** 2)
    return 100 * (mine[METRIC] - base[METRIC]), 100 * se

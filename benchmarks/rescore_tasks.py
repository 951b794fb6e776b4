"""Re-read the task rows a specialize or tasks result holds by each task's current metric, in place.

`python benchmarks/rescore_tasks.py benchmarks/results/specialize-smollm2-135m.json [...]`

Every task row keeps acc and acc_norm with their standard errors, so a change of the metric a task is judged
by (`metadata.expertkit_metric` of the shipped configs: on 2026-12-07 the domain tasks moved from acc_norm to
acc, lm-eval's metric for such tasks) re-reads the summary without rerunning a model: forgetting, the domain
task's change by the headline metric and by acc_norm. Prints, per expert, the domain task's change before and
after, and how far its forgetting moved (0 when the general tasks' metric did not change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

# the summary keys of a result: (forgetting, domain task change, the same by acc_norm)
KEYS = {"specialize": ("general_tasks_acc_norm_change", "domain_task_acc_change", "domain_task_acc_norm_change"),
        "tasks": ("forgetting", "domain_skill", "domain_skill_acc_norm")}


def rescore(result: dict) -> dict[str, tuple[float | None, float | None, float | None]]:
    """Update `result` in place; {expert: (domain task change before, after, how far forgetting moved)}."""
    from expertkit.tasks.local import local_tasks
    from expertkit.tasks.run import headline_metric, summarize, task_metrics

    metrics = {name: config["metadata"]["expertkit_metric"] for name, config in local_tasks().items()}
    rows = result["task_rows"] if "task_rows" in result else result["rows"]
    for row in rows:
        if "stderr" in row:  # rows written before the metric was a field: "stderr" was acc_norm's
            row["acc_norm_stderr"] = row.pop("stderr")
        row["metric"] = headline_metric(metrics.get(row["task"]), row)  # a task lm-eval named: its default
    if "task_rows" in result:  # a specialize result: experts are named by their domain
        experts = {name: name for name in result["domains"]}
        forgetting, skill, skill_by_acc_norm = KEYS["specialize"]
    else:
        experts = {name: name for name in result["forgetting"]}
        forgetting, skill, skill_by_acc_norm = KEYS["tasks"]
    before, forgot = dict(result.get(skill, {})), dict(result.get(forgetting, {}))
    card, by_acc_norm = summarize(rows, experts), summarize(rows, experts, metric="acc_norm")
    result[forgetting], result[skill] = card["forgetting"], card["domain_skill"]
    result[skill_by_acc_norm] = by_acc_norm["domain_skill"]
    result["task_metrics"] = task_metrics(rows)
    for name, row in result.get("domains", {}).items():
        if "domain_task_acc_change" in row:
            row["domain_task_acc_change"] = card["domain_skill"].get(name)
    result["rescored"] = {"by": "benchmarks/rescore_tasks.py", "at": time.strftime("%Y-%m-%d"),
                          "metrics": result["task_metrics"]}
    moved = {name: abs(card["forgetting"][name] - forgot[name]) if name in forgot and name in card["forgetting"]
             else None for name in experts}
    return {name: (before.get(name), card["domain_skill"].get(name), moved[name]) for name in experts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="specialize or tasks result JSON files")
    args = parser.parse_args(argv)
    results = {}
    for path in args.results:
        try:
            results[path] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # checked before anything is rewritten
            print(f"error: {path}: cannot read it as JSON ({e}); pass result files of benchmarks/run.py",
                  file=sys.stderr)
            return 2
    without_rows = [str(path) for path, result in results.items() if not ({"task_rows", "rows"} & set(result))]
    if without_rows:
        print(f"error: {', '.join(without_rows)}: no task rows; pass the JSON of a specialize run on a real base "
              "or of the tasks suite", file=sys.stderr)
        return 2
    width = max(len(path.name) for path in results) + 2
    print(f"{'file':<{width}} {'expert':<12} {'domain task before':>18} {'after':>8} {'forgetting moved by':>20}")
    for path, result in results.items():
        for expert, (before, after, moved) in rescore(result).items():
            print(f"{path.name:<{width}} {expert:<12} {_points(before):>18} {_points(after):>8} "
                  f"{'-' if moved is None else f'{moved:.1e}':>20}")
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
